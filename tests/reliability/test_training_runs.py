"""Training artefacts: outputs checked before any work, checkpoints keyed on everything that changes
the result (named when they differ), resume=False never destroys a checkpoint, NaN never saved."""

from __future__ import annotations

import os
import warnings

import pytest
import torch
from diffusers import EulerDiscreteScheduler

from harmonica import Router, train_router

from ..harmonica.tiny_models import ddim, tiny_dit

STEPS = 3
COMMON = dict(num_steps=STEPS, iterations=STEPS - 1, batch_size=2, lambda_variant="none", progress=False)


def _cli_refuses_before_loading(monkeypatch, capsys, argv, message):
    import harmonica.models
    from harmonica.cli import main

    def no_load(*args, **kwargs):
        raise AssertionError("the model was loaded before the output was checked")

    monkeypatch.setattr(harmonica.models, "load_local", no_load)
    with pytest.raises(SystemExit) as exc:
        main(["train", *argv])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_cli_train_refuses_an_out_in_a_missing_folder_before_loading_anything(tmp_path, monkeypatch, capsys):
    out = tmp_path / "no" / "such" / "r.safetensors"
    _cli_refuses_before_loading(monkeypatch, capsys, ["--out", str(out)], "does not exist; create it")


def test_cli_train_refuses_an_out_that_is_a_folder(tmp_path, monkeypatch, capsys):
    _cli_refuses_before_loading(monkeypatch, capsys, ["--out", str(tmp_path)], "is a folder")


def test_cli_train_refuses_a_checkpoint_dir_that_is_a_file(tmp_path, monkeypatch, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    argv = ["--out", str(tmp_path / "r.safetensors"), "--checkpoint-dir", str(blocker)]
    _cli_refuses_before_loading(monkeypatch, capsys, argv, "is a file, not a folder")


def test_train_router_refuses_an_unusable_checkpoint_dir_before_training(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    trained = []
    with pytest.raises(ValueError, match="checkpoint_dir .* is a file"):
        train_router(tiny_dit(), ddim(), checkpoint_dir=blocker, callback=trained.append, **COMMON)
    assert trained == []


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs a read-only /proc (Linux)")
def test_train_router_refuses_an_unwritable_checkpoint_dir_before_training():
    trained, folder = [], "/proc/harmonica-checkpoints"
    with pytest.raises(ValueError, match=f"checkpoint_dir {folder} cannot be created"):
        train_router(tiny_dit(), ddim(), checkpoint_dir=folder, callback=trained.append, **COMMON)
    assert trained == []


@pytest.mark.parametrize("change", ["scheduler", "scheduler config", "class labels", "weights"])
def test_resume_refuses_a_checkpoint_of_another_run_and_names_the_difference(tmp_path, change):
    train_router(tiny_dit(), ddim(), checkpoint_dir=tmp_path, **COMMON)
    model, scheduler, extra = tiny_dit(), ddim(), {}
    if change == "scheduler":
        scheduler = EulerDiscreteScheduler.from_config(scheduler.config)
        expected = "scheduler: DDIMScheduler in the checkpoint, EulerDiscreteScheduler now"
    elif change == "scheduler config":
        scheduler = ddim()
        scheduler.register_to_config(timestep_spacing="trailing")
        expected = "scheduler: config timestep_spacing"
    elif change == "class labels":
        extra = dict(class_labels=torch.tensor([1, 2]))
        expected = "conditioning"
    else:
        model = tiny_dit(seed=1)
        expected = "weights"
    with pytest.raises(ValueError, match="another training run") as err:
        train_router(model, scheduler, checkpoint_dir=tmp_path, **COMMON, **extra)
    assert expected in str(err.value)


def test_resume_false_moves_the_checkpoint_aside_instead_of_overwriting_it(tmp_path):
    train_router(tiny_dit(), ddim(), checkpoint_dir=tmp_path, **COMMON)
    saved = (tmp_path / "router-training.pt").read_bytes()
    with pytest.warns(UserWarning, match="moved to router-training.1.pt"):
        train_router(tiny_dit(), ddim(), checkpoint_dir=tmp_path, resume=False, **COMMON, lr=0.5)
    assert (tmp_path / "router-training.1.pt").read_bytes() == saved
    assert (tmp_path / "router-training.pt").is_file()


def test_a_diverged_run_is_refused_when_saved_not_only_when_loaded(tmp_path):
    with pytest.raises(ValueError, match="diverged"):
        train_router(tiny_dit(), ddim(), checkpoint_dir=tmp_path, **COMMON, guidance_scale=float("inf"))
    assert not (tmp_path / "router-training.pt").exists()
    with pytest.raises(ValueError, match="diverged"):
        train_router(tiny_dit(), ddim(), **COMMON, guidance_scale=float("inf"))
    router = Router(STEPS, 4)
    with torch.no_grad():
        router.logits[1, 1] = float("nan")
    with warnings.catch_warnings(), pytest.raises(ValueError, match="NaN or infinity"):
        router.save(tmp_path / "r.safetensors")
    assert not (tmp_path / "r.safetensors").exists()
