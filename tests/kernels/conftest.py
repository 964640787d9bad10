import os

import pytest
import torch

import harmonica_kernels as hk

# CI sets this so that a backend which failed to build fails the run instead of being skipped.
REQUIRED = {b for b in os.environ.get("HARMONICA_REQUIRE_BACKENDS", "").split(",") if b}


def backend_device(name: str) -> str:
    """The device a backend's tests run on: CUDA for cuda (and triton where a GPU exists)."""
    if name == "cuda" or (name == "triton" and torch.cuda.is_available()):
        return "cuda"
    return "cpu"


@pytest.fixture(params=["torch", "cpp", "triton", "cuda"])
def backend(request):
    """Runs the test once per backend, with that backend forced; missing ones skip with the reason."""
    name = request.param
    if name not in hk.available_backends():
        reason = hk.missing_backends()[name]
        if name in REQUIRED:
            pytest.fail(f"required backend {name} is missing: {reason}")
        pytest.skip(f"backend {name} unavailable: {reason}")
    with hk.use_backend(name):
        yield name


@pytest.fixture
def device(backend):
    return backend_device(backend)
