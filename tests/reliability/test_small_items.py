"""The smaller items of issue 17: autocast, pickling, compile order, aliasing, CLI flags and start-up,
and a save killed half-way."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import harmonica
import harmonica_kernels as hk
from harmonica import CacheSchedule, disable_cache, enable_cache, units
from harmonica.cache import CacheStateError

from ..harmonica.tiny_models import CAPTION_CHANNELS, TEXT_TOKENS, tiny_dit, tiny_pixart

# Subprocesses import the same harmonica and harmonica_kernels as this process.
_PATHS = [str(Path(m.__file__).resolve().parents[1]) for m in (harmonica, hk)]
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([*_PATHS, os.environ.get("PYTHONPATH", "")])}
DIT_ARGS = dict(timestep=torch.tensor([999, 999]), class_labels=torch.tensor([1, 2]))


def test_pixart_under_bf16_autocast_names_autocast_and_the_fix():
    model = tiny_pixart()
    enable_cache(model, CacheSchedule.full(2, len(units(model))))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        with pytest.raises(TypeError, match="autocast.*model.to\\(torch.bfloat16\\)"):
            model(
                torch.randn(2, 4, 8, 8),
                encoder_hidden_states=torch.randn(2, TEXT_TOKENS, CAPTION_CHANNELS),
                timestep=torch.tensor([999, 999]),
                added_cond_kwargs={"resolution": None, "aspect_ratio": None},
            )


def test_torch_save_and_load_of_a_cached_model():
    model = tiny_dit()
    enable_cache(model, CacheSchedule.fora(2, len(units(model)), 2))
    x = torch.ones(2, 4, 8, 8)
    with torch.no_grad():
        expected = model(x, **DIT_ARGS).sample
    model.__dict__["_harmonica_cache"].reset()
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x, **DIT_ARGS).sample, expected, rtol=0, atol=0)
    disable_cache(loaded)
    assert type(loaded) is type(tiny_dit())


def test_a_model_compiled_before_enable_cache_says_to_compile_after():
    model = tiny_dit()
    compiled = torch.compile(model, backend="eager")
    enable_cache(model, CacheSchedule.fora(2, len(units(model)), 2))
    with torch.no_grad(), pytest.raises(CacheStateError, match="torch.compile the model after enable_cache"):
        compiled(torch.ones(2, 4, 8, 8), **DIT_ARGS)
    torch._dynamo.reset()


def test_a_compiled_cached_model_used_after_disable_cache_says_so():
    model = tiny_dit()
    enable_cache(model, CacheSchedule.fora(2, len(units(model)), 2))
    compiled = torch.compile(model, backend="eager")
    with torch.no_grad():
        compiled(torch.ones(2, 4, 8, 8), **DIT_ARGS)
        disable_cache(model)
        with pytest.raises(CacheStateError, match="caching has since been disabled"):
            compiled(torch.ones(2, 4, 8, 8), **DIT_ARGS)
    torch._dynamo.reset()


@pytest.mark.parametrize("alias", ["gate", "shift", "scale"])
def test_a_modulation_sharing_memory_with_the_cache_being_written_is_refused(alias):
    x, y = torch.randn(2, 4, 8), torch.randn(2, 4, 8)
    cache = torch.zeros(2, 4, 8)
    rows = {name: torch.randn(2, 8) for name in ("gate", "shift", "scale")}
    rows[alias] = cache[:, 0, :]  # a view into the cache that the op overwrites
    with pytest.raises(ValueError, match=f"cache shares memory with {alias}"):
        hk.gated_residual_norm_modulate(x, rows["gate"], y, rows["shift"], rows["scale"], 1e-6, cache=cache)
    if alias == "gate":
        with pytest.raises(ValueError, match="cache shares memory with gate"):
            hk.gated_residual_update_(x, rows["gate"], y, cache)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["train", "--threads", "-3"], "--threads: '-3': give a thread count >= 1"),
        (["sample", "--threads", "-3"], "--threads: '-3'"),
        (["train", "--device", "cuda"], "--device cuda: this torch"),
        (["sample", "--device", "cuda"], "--device cuda: this torch"),
        (["train", "--device", "gpu0"], "--device 'gpu0' is not a device name"),
    ],
)
def test_bad_cli_flags_are_one_line_errors(argv, message, tmp_path):
    if "cuda" in argv and torch.cuda.is_available():
        pytest.skip("this torch has CUDA")
    run = subprocess.run(
        [sys.executable, "-m", "harmonica.cli", *argv, "--out", str(tmp_path / "out.safetensors")],
        capture_output=True,
        text=True,
        env=ENV,
        cwd=tmp_path,
        timeout=300,
    )
    assert run.returncode == 2
    assert message in run.stderr and "Traceback" not in run.stderr, run.stderr


def test_help_imports_neither_torch_nor_diffusers_and_python_m_harmonica_works():
    probe = (
        "import sys, contextlib, io\n"
        "from harmonica.cli import main\n"
        "with contextlib.suppress(SystemExit), contextlib.redirect_stdout(io.StringIO()):\n"
        "    main(['--help'])\n"
        "print(sorted(m for m in ('torch', 'diffusers') if m in sys.modules))\n"
    )
    run = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=ENV, timeout=120)
    assert run.stdout.strip() == "[]", run.stdout + run.stderr
    run = subprocess.run(
        [sys.executable, "-m", "harmonica", "--help"], capture_output=True, text=True, env=ENV, timeout=120
    )
    assert run.returncode == 0 and "quickstart" in run.stdout, run.stderr


def test_a_checkpoint_save_killed_half_way_leaves_no_temporary_file(tmp_path):
    # torch.save writes a megabyte, says so, then hangs until SIGKILL: the kill lands mid-save.
    script = f"""
import os, sys, time, torch
from pathlib import Path
from harmonica import Router
from harmonica.training import _save_checkpoint, _State

def slow_save(obj, f, *args, **kwargs):
    data = b"x" * 1_000_000
    if isinstance(f, (str, os.PathLike)):
        Path(f).write_bytes(data)
    else:
        f.write(data)
        f.flush()
    print("written", flush=True)
    time.sleep(120)

torch.save = slow_save
router = Router(3, 4)
optimizer = torch.optim.AdamW(router.parameters())
_save_checkpoint(Path({str(tmp_path)!r}) / "router-training.pt", {{}}, router, optimizer,
                 _State(beta=1.0, lam=torch.ones(3)))
"""
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, env=ENV)
    try:
        assert proc.stdout.readline().strip() == "written"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    assert os.listdir(tmp_path) == []
