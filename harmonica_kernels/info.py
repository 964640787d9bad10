"""``python -m harmonica_kernels.info``: versions, what was built, and the active backends."""

from __future__ import annotations

import platform

import torch

from . import _backend


def report() -> str:
    lines = [
        f"python           {platform.python_version()}",
        f"torch            {torch.__version__} (CUDA {torch.version.cuda or 'none'})",
    ]
    try:
        import triton

        lines.append(f"triton           {triton.__version__}")
    except ImportError:
        lines.append("triton           not installed")
    lines.append(f"CUDA device      {torch.cuda.get_device_name() if torch.cuda.is_available() else 'none'}")
    lines.append("backends:")
    missing = _backend.missing_backends()
    for name in _backend.BACKENDS:
        state = "available" if name in _backend.available_backends() else f"missing: {missing[name]}"
        lines.append(f"  {name:<7} {state}")
    lines.append(f"active on cpu    {_backend.get_backend('cpu')}")
    if torch.cuda.is_available():
        lines.append(f"active on cuda   {_backend.get_backend('cuda')}")
    return "\n".join(lines)


if __name__ == "__main__":
    print(report())
