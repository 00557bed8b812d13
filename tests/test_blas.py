"""The BLAS that MLX's Linux CPU backend computes with: found, proven on this CPU, or skipped.

A library built for another CPU must never kill a command: these tests run candidates that die by a
signal or compute wrong, and (where Debian's qemu-user is installed) the whole import and a matmul
on an emulated CPU without AVX-512.
"""

import json
import os
import platform
import shutil
import subprocess
import sys
import textwrap

import mlx.core as mx
import numpy as np
import pytest

from mm1_mlx import backend_info
from mm1_mlx.cpu import blas as backend

LINUX_REFERENCE = (sys.platform.startswith("linux") and backend._reference_blas_in_wheel()
                   and os.environ.get("MM1_MLX_BLAS", "").lower() not in backend._OFF)
needs_binding = pytest.mark.skipif(not LINUX_REFERENCE,
                                   reason="only the Linux mlx[cpu] wheel needs a BLAS bound")
needs_cc = pytest.mark.skipif(shutil.which("cc") is None, reason="no C compiler to build a fake BLAS")

CHECK = """if True:
    import json, mm1_mlx
    import mlx.core as mx
    a = mx.arange(64 * 64, dtype=mx.float32).reshape(64, 64) % 7 - 3
    info = mm1_mlx.backend_info()
    print(json.dumps({"sum": (a @ a.T).sum().item(), "blas": info["blas"], "core": info["blas_core"],
                      "skipped": info["blas_skipped"]}))
"""
EXPECTED_SUM = float(((np.arange(64 * 64).reshape(64, 64) % 7 - 3) @
                      (np.arange(64 * 64).reshape(64, 64) % 7 - 3).T).sum())


def run_check(tmp_path, env=None, prefix=()):
    """Import mm1_mlx and multiply in a fresh process with its own (empty) verdict cache, with
    the default candidates unless ``env`` names one."""
    full = {k: v for k, v in os.environ.items() if k != "MM1_MLX_BLAS"}
    full.update(XDG_CACHE_HOME=str(tmp_path / "cache"), **(env or {}))
    out = subprocess.run([*prefix, sys.executable, "-c", CHECK], env=full, capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1]), out.stderr


def build_fake_blas(tmp_path, body: str) -> str:
    """A shared library exporting cblas_sgemm / cblas_sgemv with the given C body."""
    src, lib = tmp_path / "fake.c", tmp_path / "libfakeblas.so"
    src.write_text(textwrap.dedent(body))
    subprocess.run(["cc", "-shared", "-fPIC", "-o", str(lib), str(src)], check=True)
    return str(lib)


@needs_binding
def test_bound_openblas_computes_like_numpy():
    info = backend_info()
    assert info["blas"].startswith("openblas"), info
    assert info["blas_core"], info  # the kernel set OpenBLAS chose for this CPU
    a = mx.random.normal((96, 80))
    b = mx.random.normal((80, 72))
    np.testing.assert_allclose(np.array(a @ b), np.array(a) @ np.array(b), rtol=1e-4, atol=1e-4)


@needs_binding
def test_dynamic_dispatch_picks_kernels_for_a_cpu_without_avx512(tmp_path):
    # OPENBLAS_CORETYPE makes a DYNAMIC_ARCH build use the kernels it would pick on a Haswell CPU
    # (AVX2 + FMA, no AVX-512): a single-target build (cmeel-openblas 0.3.31) cannot do this
    found, _ = run_check(tmp_path, {"OPENBLAS_CORETYPE": "Haswell"})
    assert found["core"] == "Haswell", found
    assert found["sum"] == EXPECTED_SUM


@needs_binding
@needs_cc
def test_a_candidate_killed_by_a_signal_is_skipped_and_reported(tmp_path):
    lib = build_fake_blas(tmp_path, """
        #include <signal.h>
        void cblas_sgemm(void) { raise(SIGILL); }
        void cblas_sgemv(void) { raise(SIGILL); }
    """)
    found, err = run_check(tmp_path, {"MM1_MLX_BLAS": lib})
    assert found["sum"] == EXPECTED_SUM
    assert found["blas"].startswith("openblas (") and "MM1_MLX_BLAS" not in found["blas"]
    assert found["skipped"][0]["path"] == lib and "SIGILL" in found["skipped"][0]["reason"]
    line = [x for x in err.splitlines() if "skipped BLAS" in x]
    assert len(line) == 1 and "SIGILL" in line[0] and lib in line[0], err
    # the verdict is cached for this library file and CPU: the next run does not probe again
    found, err = run_check(tmp_path, {"MM1_MLX_BLAS": lib})
    assert "SIGILL" in found["skipped"][0]["reason"] and "skipped BLAS" not in err


@needs_binding
@needs_cc
def test_a_candidate_that_computes_wrong_is_skipped(tmp_path):
    lib = build_fake_blas(tmp_path, """
        void cblas_sgemm(int o, int ta, int tb, int m, int n, int k, float al, const float *a,
                         int lda, const float *b, int ldb, float be, float *c, int ldc) {
            for (int i = 0; i < m * n; i++) c[i] = 1.0f;
        }
        void cblas_sgemv(void) {}
    """)
    found, err = run_check(tmp_path, {"MM1_MLX_BLAS": lib})
    assert found["sum"] == EXPECTED_SUM
    assert "wrong value" in found["skipped"][0]["reason"], found


@needs_binding
def test_a_missing_override_is_reported_and_the_default_is_used(tmp_path):
    found, err = run_check(tmp_path, {"MM1_MLX_BLAS": str(tmp_path / "nope.so")})
    assert found["blas"].startswith("openblas (") and found["sum"] == EXPECTED_SUM
    assert "no such file" in found["skipped"][0]["reason"] and "skipped BLAS" in err


def test_off_uses_the_wheels_own_blas(tmp_path):
    found, err = run_check(tmp_path, {"MM1_MLX_BLAS": "off"})
    assert found["blas"] in ("reference", "linked", "accelerate") and found["sum"] == EXPECTED_SUM


QEMU = shutil.which("qemu-x86_64")


@needs_binding
@pytest.mark.skipif(platform.machine() != "x86_64" or QEMU is None,
                    reason="needs Debian's qemu-user (qemu-x86_64) on x86_64; .ci/run installs it")
@pytest.mark.slow
def test_import_and_matmul_on_an_emulated_cpu_without_avx512(tmp_path):
    # the whole import, the probes and a matmul on a Haswell CPU (AVX2, no AVX-512), whatever CPU
    # runs the tests; an installed single-target cmeel-openblas is offered first, as a user's
    # leftover would be: built for AVX-512 it must be skipped, never crash the command
    env = {}
    cmeel = backend._find("cmeel.prefix/lib/libopenblas.so.0")
    if cmeel:
        env["MM1_MLX_BLAS"] = cmeel
    found, err = run_check(tmp_path, env, prefix=(QEMU, "-cpu", "Haswell"))
    assert found["sum"] == EXPECTED_SUM
    assert found["blas"] == "openblas (scipy-openblas32)" and found["core"] == "Haswell", found
    if cmeel:
        why = found["skipped"][0]["reason"]
        assert found["skipped"][0]["path"] == cmeel and ("SIGILL" in why or "probe" in why), found


def test_symbol_reader_finds_the_renamed_cblas_names():
    if not LINUX_REFERENCE or backend_info()["blas"] != "openblas (scipy-openblas32)":
        pytest.skip("scipy-openblas32 is not the bound library")
    names = set(backend._exported_symbols(backend_info()["blas_path"]))
    assert {"cblas_sgemm", "cblas_sgemv", "sgemm_"} <= names
    assert not any(n.startswith("scipy_") for n in names)
