"""Backend discovery, choice and the reasons given when one is missing."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
import torch

import harmonica_kernels as hk
from harmonica_kernels import _backend


def test_torch_backend_always_available():
    assert "torch" in hk.available_backends()
    assert set(hk.available_backends()).isdisjoint(hk.missing_backends())
    assert set(hk.available_backends()) | set(hk.missing_backends()) == set(_backend.BACKENDS)


def test_default_choice_per_device():
    expected_cpu = "cpp" if "cpp" in hk.available_backends() else "torch"
    assert hk.get_backend("cpu") == expected_cpu


def test_set_backend_validates_and_restores():
    with pytest.raises(ValueError, match="unknown harmonica backend 'fast'"):
        hk.set_backend("fast")
    for name, reason in hk.missing_backends().items():
        with pytest.raises(RuntimeError, match=re.escape(f"not available: {reason}")):
            hk.set_backend(name)
    with hk.use_backend("torch"):
        assert hk.get_backend("cpu") == "torch"
    hk.set_backend("auto")
    assert hk.get_backend("cpu") in ("cpp", "torch")


def test_cpu_only_backend_refuses_cuda_tensors():
    if "cpp" not in hk.available_backends():
        pytest.skip("needs the cpp backend")
    with hk.use_backend("cpp"):
        with pytest.raises(RuntimeError, match="cannot run on cuda tensors"):
            hk.get_backend("cuda")


def _run(code: str, **env) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env={**os.environ, **env}, timeout=120
    )


def test_env_var_forces_backend():
    proc = _run("import harmonica_kernels as hk; print(hk.get_backend('cpu'))", HARMONICA_BACKEND="torch")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "torch"


def test_env_var_with_unknown_backend_is_a_clear_error():
    proc = _run("import harmonica_kernels", HARMONICA_BACKEND="nope")
    assert proc.returncode != 0 and "unknown harmonica backend 'nope'" in proc.stderr


def test_no_ext_falls_back_to_torch():
    code = (
        "import torch, harmonica_kernels as hk; x = torch.randn(2, 3, 4); "
        "print(hk.get_backend('cpu'), hk.missing_backends()['cpp']); "
        "print(torch.allclose(hk.cached_gated_residual(x, None, x.clone()), 2 * x))"
    )
    proc = _run(code, HARMONICA_NO_EXT="1")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["torch", "disabled", "by", "HARMONICA_NO_EXT=1", "True"]


def test_info_module_reports_backends():
    proc = subprocess.run(
        [sys.executable, "-m", "harmonica_kernels.info"], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    assert f"torch            {torch.__version__}" in proc.stdout
    for name in _backend.BACKENDS:
        assert f"  {name:<7} " in proc.stdout
    assert "active on cpu" in proc.stdout
