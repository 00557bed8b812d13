"""Which BLAS the MLX CPU backend uses, and binding a fast one before ``mlx.core`` loads.

The Linux ``mlx[cpu]`` wheel links a reference BLAS (``mlx_cpu.libs/libblas-*.so``): a 2048^3 fp32
matmul runs at ~6 GFLOP/s on a 2-core x86 machine. Loading an OpenBLAS with ``RTLD_GLOBAL`` before
``mlx.core`` makes the dynamic linker resolve ``cblas_sgemm`` & co. to it instead (~200 GFLOP/s).

Sources, in order: ``MM1_MLX_BLAS=/path/libopenblas.so`` (or ``off``), Debian's
``libopenblas0``, then the ``cmeel-openblas`` wheel. The wheel's library needs ``libgfortran.so.5``;
when the system has none we reuse the copy that ships inside ``mlx_cpu.libs`` (renamed by auditwheel),
under its standard soname, in a per-user cache directory.
"""

from __future__ import annotations

import ctypes
import glob
import os
import sys
import sysconfig

_STATE = {"blas": None, "path": None, "error": None}

_SYSTEM_OPENBLAS = [
    "/usr/lib/x86_64-linux-gnu/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/libopenblas.so.0",
    "/usr/lib64/libopenblas.so.0",
]


def _site_dirs() -> list[str]:
    dirs = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    dirs.update(p for p in sys.path if p.endswith("site-packages"))
    return sorted(dirs)


def _find(pattern: str) -> str | None:
    for site in _site_dirs():
        hits = sorted(glob.glob(os.path.join(site, pattern)))
        if hits:
            return hits[0]
    return None


def _reference_blas_in_wheel() -> bool:
    return _find("mlx_cpu.libs/libblas-*.so*") is not None


def _gfortran_shim() -> None:
    """Make ``libgfortran.so.5`` resolvable, reusing the copy inside ``mlx_cpu.libs``."""
    try:
        ctypes.CDLL("libgfortran.so.5", mode=ctypes.RTLD_GLOBAL)
        return
    except OSError:
        pass
    src = _find("mlx_cpu.libs/libgfortran-*.so*")
    quadmath = _find("mlx_cpu.libs/libquadmath-*.so*")
    if src is None:
        raise OSError("libgfortran.so.5 not found (install libgfortran5)")
    if quadmath is not None:
        ctypes.CDLL(quadmath, mode=ctypes.RTLD_GLOBAL)
    cache = os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "mm1_mlx", "blas"
    )
    dst = os.path.join(cache, f"libgfortran.so.5.{os.path.getsize(src)}")
    if not os.path.exists(dst):
        data = open(src, "rb").read()
        old = os.path.basename(src).encode() + b"\0"
        new = b"libgfortran.so.5"
        if data.count(old) != 1 or len(new) >= len(old):
            raise OSError(f"cannot derive libgfortran.so.5 from {src}")
        os.makedirs(cache, exist_ok=True)
        tmp = f"{dst}.{os.getpid()}.tmp"
        with open(tmp, "wb") as f:
            f.write(data.replace(old, new + b"\0" * (len(old) - len(new))))
        os.replace(tmp, dst)
    ctypes.CDLL(dst, mode=ctypes.RTLD_GLOBAL)


def _candidates() -> list[tuple[str, str]]:
    override = os.environ.get("MM1_MLX_BLAS", "")
    if override:
        return [("env", override)]
    found = [("system", p) for p in _SYSTEM_OPENBLAS if os.path.exists(p)]
    cmeel = _find("cmeel.prefix/lib/libopenblas.so.0")
    if cmeel:
        found.append(("cmeel-openblas", cmeel))
    return found


def bind_blas() -> str:
    """Bind an optimized BLAS if the CPU backend would use the wheel's reference one.

    Must run before ``mlx.core`` is imported; returns the name of the BLAS in use.
    """
    if _STATE["blas"] is not None:
        return _STATE["blas"]
    if sys.platform == "darwin":
        _STATE["blas"] = "accelerate"
    elif "mlx.core" in sys.modules:
        _STATE["blas"] = "reference" if _reference_blas_in_wheel() else "linked"
        _STATE["error"] = "mlx.core was imported before mm1_mlx; import mm1_mlx first"
    elif os.environ.get("MM1_MLX_BLAS", "").lower() in ("off", "0", "none", "reference"):
        _STATE["blas"] = "reference" if _reference_blas_in_wheel() else "linked"
    elif not _reference_blas_in_wheel():
        _STATE["blas"] = "linked"
    else:
        _STATE["blas"] = "reference"
        for name, path in _candidates():
            try:
                if name != "system":
                    _gfortran_shim()
                ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
            except OSError as e:
                _STATE["error"] = f"{name}: {e}"
                continue
            _STATE.update(blas=f"openblas ({name})", path=path, error=None)
            break
    return _STATE["blas"]


def sgemv():
    """The bound OpenBLAS's ``cblas_sgemv`` (ctypes), or None. MLX computes a one-row product
    with ``sgemm``, which reads the weight at ~20 GB/s here against ~29 GB/s for ``sgemv``."""
    return _blas_function("cblas_sgemv", "iiiifpipifpi")


def sgemm_batch_strided():
    """The bound OpenBLAS's ``cblas_sgemm_batch_strided`` (ctypes; OpenBLAS >= 0.3.28), or None.
    A decode step's attention reads each head's cached keys and values with it: its threads split
    the heads (~27 GB/s here, against ~17 for numpy's one-thread matmul loop)."""
    return _blas_function("cblas_sgemm_batch_strided", "iiiiiifpiipiifpiii")


_CTYPES = {"i": ctypes.c_int, "f": ctypes.c_float, "p": ctypes.c_void_p}


def _blas_function(name: str, signature: str):
    """``name`` from the bound OpenBLAS as a ctypes function (arguments: i int, f float, p
    pointer; returns nothing), looked up once; None without a bound OpenBLAS or that symbol."""
    if _STATE["path"] is None:
        return None
    functions = _STATE.setdefault("functions", {})
    if name not in functions:
        fn = getattr(ctypes.CDLL(_STATE["path"]), name, None)
        if fn is not None:
            fn.argtypes = [_CTYPES[c] for c in signature]
            fn.restype = None
        functions[name] = fn
    return functions[name]


M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters


def retain_freed_memory() -> bool:
    """Let glibc keep freed blocks of up to 32 MB for reuse instead of returning them to the
    system (its default for blocks over ~128 KB-32 MB). Inference frees and reallocates the same
    large buffers (numpy temporaries, MLX arrays) every layer and every token, and each page the
    system hands back costs a fault: ~5-10 us each on the development VM, 40-70k faults (0.2-0.5
    s) per 622-token answer of the benchmark model; ~200 with this. Peak RSS is unchanged.
    ``MM1_MLX_MALLOC=default`` keeps glibc's behaviour. Returns whether the setting is in force."""
    if _STATE.get("malloc") is None:
        _STATE["malloc"] = False
        if sys.platform.startswith("linux") and os.environ.get("MM1_MLX_MALLOC") != "default":
            try:
                mallopt = ctypes.CDLL(None).mallopt
            except (OSError, AttributeError):  # not glibc (musl has no mallopt)
                return False
            mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
            _STATE["malloc"] = bool(mallopt(M_MMAP_THRESHOLD, 32 << 20)
                                    and mallopt(M_TRIM_THRESHOLD, 512 << 20))
    return _STATE["malloc"]


def backend_info() -> dict:
    """What MLX computes with: device, BLAS library and versions."""
    import mlx.core as mx

    return {
        "mlx": mx.__version__,
        "device": str(mx.default_device()),
        "metal": bool(mx.metal.is_available()),
        "blas": _STATE["blas"],
        "blas_path": _STATE["path"],
        "blas_error": _STATE["error"],
        "retain_freed_memory": bool(_STATE.get("malloc")),
    }
