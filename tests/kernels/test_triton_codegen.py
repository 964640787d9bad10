"""The Triton kernels compiled for sm_90 (no GPU needed): 128-bit global memory accesses, no spills.

Runs ``python -m harmonica_kernels.triton.codegen --json`` in a subprocess without
``TRITON_INTERPRET`` (the interpreter, which the other kernel tests use on a CPU, cannot compile).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

ROOT = Path(__file__).resolve().parents[2]

# Accesses that are not 128-bit by design: the routing weight r (one scalar per program), the forecast
# coefficients a and b (two scalars per program); in the backward the per-tile partial sums (one
# fp32 per feature of a program's tile, and one for r), and in its last arrivals' sums the partials
# of r (a masked count, loaded one by one: a few KB), the two outputs (one value per thread) and
# the two arrival counters set back to zero.
SCALAR_LOADS = {
    "_routed_gated_residual_kernel": 1,
    "_routed_gated_residual_backward_kernel": 5,
    "_gated_residual_kernel[forecast]": 2,
    "_gated_residual_norm_modulate_kernel[forecast]": 2,
    "_gated_residual_norm_modulate_chunked_kernel[forecast]": 2,
}
SCALAR_STORES = {"_routed_gated_residual_backward_kernel": 6}


def _compile_for_sm90(*flags: str) -> list[dict]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    try:
        result = subprocess.run(
            [sys.executable, "-m", "harmonica_kernels.triton.codegen", "--json", "--arch", "90", *flags],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
    except subprocess.TimeoutExpired:
        pytest.fail("compiling the kernels for sm_90 took over 10 minutes")
    if result.returncode != 0:
        missing_toolchain = any(
            s in result.stderr for s in ("No module named 'triton.backends.nvidia'", "ptxas", "FileNotFound")
        )
        if missing_toolchain and "Internal Triton PTX codegen error" not in result.stderr:
            pytest.skip(f"this triton cannot compile for sm_90 here: {result.stderr.strip()[-300:]}")
        pytest.fail(f"compiling for sm_90 failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def sm90_reports() -> list[dict]:
    return _compile_for_sm90()


def test_every_kernel_was_compiled(sm90_reports):
    kernels = {r["kernel"] for r in sm90_reports}
    assert kernels == {
        "_gated_residual_kernel",
        "_routed_gated_residual_kernel",
        "_routed_gated_residual_backward_kernel",
        "_gated_residual_norm_modulate_kernel",
        "_gated_residual_norm_modulate_chunked_kernel",
        "_gated_residual_kernel[forecast]",
        "_gated_residual_norm_modulate_kernel[forecast]",
        "_gated_residual_norm_modulate_chunked_kernel[forecast]",
    }
    assert {r["dtype"] for r in sm90_reports} == {"float32", "bfloat16"}


def test_global_accesses_are_128_bit(sm90_reports):
    for r in sm90_reports:
        name = f"{r['kernel']} ({r['dtype']})"
        narrow_stores = SCALAR_STORES.get(r["kernel"], 0)
        assert r["v4_loads"] > 0 and (r["v4_stores"] > 0 or r["stores"] <= narrow_stores), name
        assert r["loads"] - r["v4_loads"] <= SCALAR_LOADS.get(r["kernel"], 0), f"{name}: {r}"
        assert r["stores"] - r["v4_stores"] <= SCALAR_STORES.get(r["kernel"], 0), f"{name}: {r}"


def test_no_register_spills(sm90_reports):
    for r in sm90_reports:
        assert r["spill_stores"] == r["spill_loads"] == 0, r
        assert r["registers"] <= 128, r  # 8 warps at <= 128 registers keep 2 programs per SM


def test_autotuning_candidates_compile_cleanly():
    """Every (tile, warps) the autotuner may pick: no spills, 128-bit stores, and 128-bit loads of
    every streamed tensor (narrower warps may split a per-sample vector row into smaller loads)."""
    reports = _compile_for_sm90("--candidates")
    assert len({r["config"] for r in reports}) > 1
    for r in reports:
        assert r["spill_stores"] == r["spill_loads"] == 0, r
        assert r["stores"] == r["v4_stores"], r
        assert r["narrow_streamed_loads"] <= SCALAR_LOADS.get(r["kernel"], 0), r
