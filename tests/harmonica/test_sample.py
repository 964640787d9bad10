"""`harmonica sample`: images on the reference model and tiny PixArt folders, files, numbers, bad input."""

from __future__ import annotations

import re

import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file

from harmonica import Router
from harmonica.cli import main
from harmonica.quickstart import packaged_routers
from harmonica.reference import load_model, load_scheduler
from harmonica.sampling import sample

from .tiny_models import (
    CAPTION_CHANNELS,
    CHANNELS,
    LATENT,
    TEXT_TOKENS,
    ddim,
    pixart_pipeline,
    tiny_dit,
    tiny_pixart,
)

FAST = ["--steps", "4", "--labels", "0,1", "--no-progress"]


pytestmark = pytest.mark.usefixtures("one_thread")


def _tensors(path) -> dict[str, torch.Tensor]:
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def _direct(labels: list[int], steps: int, seed: int = 0) -> torch.Tensor:
    """The uncached reference model from the documented noise, without the sample command."""
    noise = torch.randn(len(labels), 1, 16, 16, generator=torch.Generator().manual_seed(seed))
    with torch.inference_mode():
        return sample(load_model(), load_scheduler(), labels, num_inference_steps=steps, noise=noise)


def _fails(capsys, argv: list[str]) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err


def test_uncached_equals_a_direct_sample_call(tmp_path, capsys):
    out, tensors = tmp_path / "u.png", tmp_path / "u.safetensors"
    # with the progress bar on: its hook must not change the transformer's output
    argv = ["sample", "--steps", "4", "--labels", "0,1", "--threads", "1"]
    assert main([*argv, "--out", str(out), "--save-tensor", str(tensors)]) == 0
    printed = capsys.readouterr().out
    assert "method    uncached: cache usage ratio 0.0%" in printed and str(out) in printed
    saved = _tensors(tensors)
    assert saved["samples"].shape == (2, 1, 16, 16) and saved["labels"].tolist() == [0, 1]
    assert torch.equal(saved["samples"], _direct([0, 1], 4))
    assert Image.open(out).size == (2 * 64 + 3 * 2, 64 + 2 * 2)  # 16 px ×4 tiles, 2 px gaps


def test_dtype_casts_the_model(tmp_path, capsys):
    tensors = tmp_path / "b.safetensors"
    argv = ["sample", *FAST, "--dtype", "bf16", "--device", "cpu", "--out", str(tmp_path / "b.png")]
    argv += ["--save-tensor", str(tensors)]
    assert main(argv) == 0
    capsys.readouterr()
    got = _tensors(tensors)["samples"]
    # bf16 weights and activations: close to the fp32 samples, not equal to them
    fp32 = _direct([0, 1], 4)
    assert got.dtype == torch.float32 and not torch.equal(got, fp32)
    assert (got - fp32).abs().mean() < 0.06, "bf16 sampling must stay near the fp32 samples (0.03 here)"


def test_fora_with_compare_uncached(tmp_path, capsys):
    out, tensors = tmp_path / "new" / "dir" / "f.png", tmp_path / "f.safetensors"
    argv = [
        "sample",
        *FAST,
        "--fora",
        "2",
        "--compare-uncached",
        "--out",
        str(out),
        "--save-tensor",
        str(tensors),
    ]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert re.search(r"PSNR      \d+\.\d\d dB vs uncached", printed)
    assert re.search(r"measured speedup \d+\.\d\d×", printed)
    method_line = next(line for line in printed.splitlines() if line.startswith("method"))
    assert "cache usage ratio 50.0%" in method_line and "FLOP ratio" in method_line
    assert "speedup" not in method_line  # the FLOP ratio is not called a speedup
    assert Image.open(out).size == (134, 2 * 68 + 8)  # uncached grid, 8 px band, cached grid
    assert [p.name for p in out.parent.iterdir()] == ["f.png"], "temporary files left behind"
    saved = _tensors(tensors)
    assert saved["samples"].shape == saved["uncached"].shape == (2, 1, 16, 16)
    assert torch.equal(saved["uncached"], _direct([0, 1], 4))
    assert not torch.equal(saved["samples"], saved["uncached"])


def test_forecast_times_run_the_rule_in_the_samplers_log_snr_or_the_blend(tmp_path, capsys):
    from harmonica import CacheSchedule, disable_cache, enable_cache, units
    from harmonica.schedule import log_snr_times

    tensors = tmp_path / "f.safetensors"
    argv = ["sample", *FAST, "--out", str(tmp_path / "f.png"), "--fora", "2", "--order", "2"]
    argv += ["--forecast-times", "log-snr"]
    assert main([*argv, "--save-tensor", str(tensors)]) == 0
    assert "FORA N=2 forecast order 2 (log-SNR)" in capsys.readouterr().out
    model, scheduler = load_model(), load_scheduler()
    times = log_snr_times(scheduler, 4)
    enable_cache(model, CacheSchedule.fora(4, len(units(model)), 2, order=2, times=times))
    noise = torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        expected = sample(model, scheduler, [0, 1], num_inference_steps=4, noise=noise)
    disable_cache(model)
    torch.testing.assert_close(_tensors(tensors)["samples"], expected)
    assert main([*argv[:-2], "--save-tensor", str(tmp_path / "blend.safetensors")]) == 0
    assert "FORA N=2 forecast order 2 " not in capsys.readouterr().out  # the default blend, unlabelled
    enable_cache(model, CacheSchedule.fora(4, len(units(model)), 2, order=2, scheduler=scheduler))
    with torch.inference_mode():
        blend = sample(model, scheduler, [0, 1], num_inference_steps=4, noise=noise)
    disable_cache(model)
    torch.testing.assert_close(_tensors(tmp_path / "blend.safetensors")["samples"], blend)
    assert not torch.equal(blend, expected)


def test_packaged_router(tmp_path, capsys):
    path = next(p for p in packaged_routers(20) if p.stem == "harmonica-T20")
    argv = ["sample", "--steps", "20", "--labels", "3,7", "--router", str(path), "--no-progress"]
    assert main([*argv, "--out", str(tmp_path / "r.png")]) == 0
    cur = Router.load(path).to_schedule(0.1).cache_usage_ratio
    assert f"router harmonica-T20 τ=0.1: cache usage ratio {cur:.1%}" in capsys.readouterr().out

    err = _fails(capsys, ["sample", *FAST, "--router", str(path), "--out", str(tmp_path / "x.png")])
    assert "trained for 20 sampling steps but 4 were asked" in err and "--steps 20" in err
    assert not (tmp_path / "x.png").exists()


def test_router_for_another_model(tmp_path, capsys):
    path = tmp_path / "tiny.safetensors"
    Router.for_model(tiny_dit(), 4).save(path)
    err = _fails(capsys, ["sample", *FAST, "--router", str(path), "--out", str(tmp_path / "x.png")])
    assert "harmonica sample: error: the router was made for" in err and "train or load a router" in err


@pytest.mark.parametrize(
    ("extra", "match"),
    [
        (
            ["--labels", "0,10,12"],
            "class labels [10, 12] are outside the model's 10 classes; pass ids in 0..9",
        ),
        (["--labels", "a,b"], "expected comma-separated class ids such as 0,3,7"),
        (["--fora", "1"], "the FORA interval must be an int >= 2"),
        (["--fora", "2", "--router", "r.safetensors"], "not allowed with argument"),
        (["--threshold", "0.2"], "--threshold is the router's τ: it needs --router"),
        (["--router", "missing.safetensors"], "no router file at missing.safetensors"),
        (["--compare-uncached"], "needs a cache: pass a router (--router) or --fora N"),
        (["--out", "samples.jpg"], "the file name must end in .png"),
        (["--save-tensor", "samples.pt"], "the file name must end in .safetensors"),
        (["--num", "3"], "not both"),
        (["--steps", "0"], "num_inference_steps must be an int >= 1"),
        (["--fora", "2", "--forecast-times", "log-snr"], "--forecast-times applies to forecasting"),
        (["--guidance", "0.5"], "guidance_scale must be >= 1"),
        (["--model", "nowhere"], "no model folder at nowhere"),
    ],
)
def test_bad_input_exits_2(tmp_path, capsys, monkeypatch, extra, match):
    monkeypatch.chdir(tmp_path)
    assert match in _fails(capsys, ["sample", *FAST, *extra])
    assert not list(tmp_path.iterdir())


def test_dit_folder_draws_labels_from_the_seed(tmp_path, capsys):
    folder = tmp_path / "dit"  # a latent DiT without a VAE, 1000 classes
    tiny_dit().save_pretrained(folder)
    ddim().save_pretrained(folder)
    tensors = tmp_path / "dit.safetensors"
    argv = ["sample", "--model", str(folder), "--steps", "3", "--num", "3", "--seed", "5", "--no-progress"]
    assert main([*argv, "--out", str(tmp_path / "dit.png"), "--save-tensor", str(tensors)]) == 0
    assert "no VAE" in capsys.readouterr().out
    saved = _tensors(tensors)
    assert (
        saved["labels"].tolist()
        == torch.randperm(1000, generator=torch.Generator().manual_seed(5))[:3].tolist()
    )
    assert saved["samples"].shape == (3, CHANNELS, LATENT, LATENT)


def test_pixart_folders(tmp_path, capsys):
    folder = tmp_path / "pixart"  # a transformer folder: latents, no VAE
    tiny_pixart().save_pretrained(folder)
    ddim().save_pretrained(folder)
    embeds = tmp_path / "prompts.safetensors"
    g = torch.Generator().manual_seed(0)
    save_file({"prompt_embeds": torch.randn(2, TEXT_TOKENS, CAPTION_CHANNELS, generator=g)}, str(embeds))
    base = ["sample", "--steps", "4", "--no-progress", "--fora", "2"]

    assert "text-conditioned: pass prompt_embeds" in _fails(capsys, [*base, "--model", str(folder)])
    err = _fails(capsys, [*base, "--model", str(folder), "--labels", "0", "--prompt-embeds", str(embeds)])
    assert "not class labels" in err

    out, tensors = tmp_path / "latents.png", tmp_path / "latents.safetensors"
    argv = [*base, "--model", str(folder), "--prompt-embeds", str(embeds), "--num", "3", "--compare-uncached"]
    assert main([*argv, "--out", str(out), "--save-tensor", str(tensors)]) == 0
    printed = capsys.readouterr().out
    assert "no VAE: the PNG shows latent channels 0-2" in printed and "PSNR" in printed
    saved = _tensors(tensors)
    assert saved["samples"].shape == saved["uncached"].shape == (3, CHANNELS, LATENT, LATENT)
    assert not torch.equal(saved["samples"], saved["uncached"])
    assert Image.open(out).mode == "RGB" and Image.open(out).size == (3 * 66 + 2, 2 * 68 + 8)

    pipe = tmp_path / "pipe"  # a pipeline folder with a VAE: decoded RGB images
    pixart_pipeline().save_pretrained(pipe)
    tensors = tmp_path / "pixels.safetensors"
    argv = [*base, "--model", str(pipe), "--prompt-embeds", str(embeds), "--save-tensor", str(tensors)]
    assert main([*argv, "--out", str(tmp_path / "pixels.png")]) == 0
    assert "no VAE" not in capsys.readouterr().out
    saved = _tensors(tensors)
    assert saved["samples"].shape == (2, 3, 2 * LATENT, 2 * LATENT) and saved["samples"].abs().max() <= 1
    assert saved["latents"].shape == (2, CHANNELS, LATENT, LATENT)
