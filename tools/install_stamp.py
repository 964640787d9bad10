"""Whether ``make install`` may skip ``pip install -e``: the editable install of this checkout is in
place and nothing its build depends on has changed since it was made.

``python tools/install_stamp.py check`` exits 0 when all of these hold, else 1 (saying why):

- the stamp (``build/install-stamp.json``, written by ``write`` after a successful install) matches
  a fingerprint of what the build reads: every file under ``csrc/``, ``setup.py``,
  ``pyproject.toml`` (dependencies, entry points), the torch version, the interpreter, this
  checkout's path and the build variables (``HARMONICA_NO_EXT``, ``FORCE_CUDA``,
  ``TORCH_CUDA_ARCH_LIST``);
- ``harmonica`` and ``harmonica_kernels`` import from this checkout, and so does the compiled
  extension ``harmonica_kernels._C`` (unless ``HARMONICA_NO_EXT=1``);
- every dependency of the ``test`` extra is installed at a version it accepts.

A fresh clone has no stamp, so it always gets the full set-up. Python sources need no reinstall:
the install is editable. ``make rebuild`` deletes the stamp.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.metadata
import importlib.util
import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
STAMP = ROOT / "build" / "install-stamp.json"
BUILD_VARIABLES = ("HARMONICA_NO_EXT", "FORCE_CUDA", "TORCH_CUDA_ARCH_LIST")


def fingerprint() -> dict[str, object]:
    import torch

    digest = hashlib.sha256()
    sources = sorted(p for p in (ROOT / "csrc").rglob("*") if p.is_file())
    for path in [*sources, ROOT / "setup.py", ROOT / "pyproject.toml"]:
        digest.update(str(path.relative_to(ROOT)).encode() + b"\0" + path.read_bytes() + b"\0")
    return {
        "build_inputs_sha256": digest.hexdigest(),
        "torch": torch.__version__,
        "python": sys.executable,
        "root": str(ROOT),
        "env": {name: os.environ.get(name) for name in BUILD_VARIABLES},
    }


def _imported_from_here() -> str | None:
    """None when the installed packages (and the extension) are this checkout's, else the reason."""
    expected = {"harmonica": ROOT / "python" / "harmonica", "harmonica_kernels": ROOT / "harmonica_kernels"}
    for name, folder in expected.items():
        try:  # located, not imported (importing harmonica loads diffusers: seconds)
            spec = importlib.util.find_spec(name)
        except (ImportError, ValueError) as err:
            return f"{name} cannot be located ({err})"
        if spec is None or spec.origin is None:
            return f"{name} is not installed"
        if Path(spec.origin).resolve().parent != folder:
            return f"{name} is installed from {Path(spec.origin).parent}, not this checkout"
    if os.environ.get("HARMONICA_NO_EXT", "0") != "1":
        try:
            extension = importlib.import_module("harmonica_kernels._C")
        except ImportError as err:
            return f"the extension does not import ({err})"
        if Path(extension.__file__).resolve().parent != expected["harmonica_kernels"]:
            return f"the extension is {extension.__file__}, not this checkout's"
    return None


def _missing_requirements() -> str | None:
    """None when every requirement of harmonica[test] is installed at an accepted version."""
    try:
        from packaging.requirements import Requirement
    except ImportError:
        return "packaging is not installed, so the requirements cannot be checked"
    for line in importlib.metadata.requires("harmonica") or []:
        requirement = Requirement(line)
        if requirement.marker is not None and not requirement.marker.evaluate({"extra": "test"}):
            continue
        try:
            version = importlib.metadata.version(requirement.name)
        except importlib.metadata.PackageNotFoundError:
            return f"{requirement.name} is not installed"
        if not requirement.specifier.contains(version, prereleases=True):
            return f"{requirement.name} {version} does not satisfy {requirement}"
    return None


def check() -> str | None:
    """None when the install may be skipped, else why not."""
    try:
        stamp = json.loads(STAMP.read_text())
    except (OSError, ValueError):
        return "no install stamp (first install here)"
    if stamp != fingerprint():
        return "csrc/, setup.py, pyproject.toml, torch or a build variable changed since the last install"
    return _imported_from_here() or _missing_requirements()


def main(argv: list[str]) -> int:
    if argv[1:] == ["check"]:
        reason = check()
        if reason is None:
            return 0
        print(f"harmonica: installing ({reason})")
        return 1
    if argv[1:] == ["write"]:
        STAMP.parent.mkdir(parents=True, exist_ok=True)
        STAMP.write_text(json.dumps(fingerprint(), indent=1) + "\n")
        return 0
    print(__doc__)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv))
