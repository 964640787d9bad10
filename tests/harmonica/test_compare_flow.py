"""``harmonica compare`` and ``harmonica sample`` on the flow-matching families (tiny random FLUX.1 and
Wan; SD3 for the conditioning checks): a flow-matching Euler loop over a prompt-embedding pool, true
CFG batched into one call (or FLUX's guidance embedding), FORA / forecasting through the engine and
diffusers' hooks as peers."""

from __future__ import annotations

import math

import pytest
import torch
from diffusers import DDIMScheduler, FlowMatchEulerDiscreteScheduler
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file

from harmonica import CacheSchedule, units
from harmonica.cli import main
from harmonica.compare import compare, flow_setup, latents_as_images, method_from_spec
from harmonica.sample_cli import sample_images

from .family_models import CHANNELS, euler, prompts, tiny
from .tiny_models import tiny_dit, tiny_vae

STEPS = 6
SIDE = 4  # image tokens per side


def _scheduler() -> FlowMatchEulerDiscreteScheduler:
    return FlowMatchEulerDiscreteScheduler(shift=3.0)


def _pool(kind: str, count: int = 3) -> dict[str, torch.Tensor]:
    text, pooled = prompts(count)
    pool = {"prompt_embeds": text}
    if kind in ("flux", "sd3"):
        pool["pooled_prompt_embeds"] = pooled
    return pool


def _compare(model, kind: str, methods, **kwargs):
    """A quick compare run on a tiny flow model or pipeline: the prompt pool, SIDE, STEPS, batch 2."""
    return compare(
        model,
        methods=methods,
        prompt_embeds=_pool(kind),
        latent_size=SIDE,
        num_inference_steps=STEPS,
        guidance_scale=2.0,
        batch_size=2,
        timing_repeats=1,
        progress=False,
        verbose=False,
        **kwargs,
    )


@pytest.mark.parametrize("kind", ["flux", "wan", "sd3"])
def test_uncached_sampler_is_the_flow_matching_euler_loop(kind):
    """compare's sampler equals an independent Euler loop with the batch doubled for true CFG (zero
    prompt as the unconditional half): the conditioning is the family's pipeline call."""
    model = tiny(kind)
    pool = _pool(kind, 2)
    setup = flow_setup(model, _scheduler(), pool, 3.0, SIDE)
    noise = torch.randn(2, *setup.sample_shape, generator=torch.Generator().manual_seed(0))
    from harmonica.compare import _flow_sampler

    ours = _flow_sampler(model, _scheduler(), STEPS, 3.0, setup)(noise, torch.arange(2))
    text, pooled = prompts(2)
    expected = euler(kind, model, noise, text, pooled, STEPS, guidance=3.0)
    torch.testing.assert_close(ours, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kind", ["flux", "wan"])
def test_compare_fora_forecast_and_peers(kind):
    model = tiny(kind)
    methods = [
        method_from_spec("fora", 2),
        method_from_spec("forecast", "2"),
        method_from_spec("fitted", "2"),
        method_from_spec("fbcache", 0.2),
        method_from_spec("magcache", 0.24),
        method_from_spec("pab", 2),
        method_from_spec("taylorseer", "2"),
    ]
    report = _compare(model, kind, methods, scheduler=_scheduler())
    num_units = len(units(model))
    assert report.context["model_class"] == type(model).__name__
    assert report.context["num_units"] == num_units and report.context["num_samples"] == 3
    assert report.context["output_space"] == "latents"
    baseline = report.rows[0]
    assert baseline.method == "uncached" and baseline.psnr is None and baseline.mse == 0

    for label, order in (("FORA N=2", 0), ("forecast N=2 order 2", 2), ("fitted forecast N=2 order 2", 2)):
        row = report.row(label)
        assert row.status == "ok", (label, row.status)
        schedule = CacheSchedule.fora(STEPS, num_units, 2, order=order)
        assert row.cache_usage_ratio == pytest.approx(schedule.cache_usage_ratio)
        assert row.skipped_share == pytest.approx(schedule.cache_usage_ratio)  # counted by hooks
        assert row.ideal_speedup > 1 and row.measured_speedup is not None
        assert row.psnr is not None and math.isfinite(row.psnr) and row.psnr > 20
        assert len(row.executed) == STEPS and len(row.executed[0]) == num_units
    # peers run through diffusers' hooks, or say why not; none crashes the sweep
    assert report.row("fitted forecast N=2 order 2").psnr != report.row("forecast N=2 order 2").psnr
    for row in report.rows[4:]:
        assert row.status in ("ok", "skipped nothing") or row.status.startswith("unavailable"), row.status
        if row.status == "ok":
            assert 0 < row.skipped_share < 1 and row.psnr is not None
    # TaylorSeer names this family's unit modules (DiT's attn1/attn2/ff patterns would miss Wan)
    assert report.row("TaylorSeer N=2").status == "ok"
    assert report.row("TaylorSeer N=2").skipped_share > 0


def test_compare_reports_a_peer_it_cannot_install_as_unavailable():
    """cache-dit refuses SD3's transformer (or is not installed), and a diffusers hook that fails on
    its blocks is reported the same way: the row says why, the sweep goes on."""
    model = tiny("sd3")
    report = compare(
        model,
        scheduler=_scheduler(),
        methods={"fora": ["2"], "dbcache": ["0.1"], "fbcache": ["0.1"]},
        prompt_embeds=_pool("sd3"),
        latent_size=SIDE,
        num_inference_steps=4,
        batch_size=3,
        timing_repeats=1,
        progress=False,
        verbose=False,
    )
    assert report.row("FORA N=2").status == "ok"
    assert report.row("DBCache F1B0 τ=0.1").status.startswith("unavailable:")
    # diffusers' FirstBlockCache expects a text output from SD3's last (context_pre_only) block
    fbcache = report.row("FBCache τ=0.1").status
    assert fbcache in ("ok", "skipped nothing") or fbcache.startswith("unavailable on SD3Transformer2DModel")


def test_flux_guidance_embedding_is_the_guidance_scale():
    """A guidance-distilled FLUX gets ``guidance_scale`` as its guidance input: one call per step of
    the batch itself (no CFG doubling), and the scale changes the samples."""
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    model = FluxTransformer2DModel(
        patch_size=1,
        in_channels=8,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=24,
        pooled_projection_dim=16,
        guidance_embeds=True,
        axes_dims_rope=(4, 6, 6),
    ).eval()
    pool = _pool("flux", 2)
    calls = []
    hook = model.register_forward_pre_hook(
        lambda m, a, kw: calls.append(kw["hidden_states"].shape[0]), with_kwargs=True
    )
    try:
        low, result = sample_images(
            model,
            scheduler=_scheduler(),
            prompt_embeds=pool,
            latent_size=SIDE,
            num_inference_steps=3,
            guidance_scale=2.0,
            progress=False,
        )
    finally:
        hook.remove()
    assert calls == [2, 2, 2]
    assert any("guidance-distilled" in n for n in result.notes)
    high, _ = sample_images(
        model,
        scheduler=_scheduler(),
        prompt_embeds=pool,
        latent_size=SIDE,
        num_inference_steps=3,
        guidance_scale=5.0,
        progress=False,
    )
    assert not torch.equal(low, high)


@pytest.mark.parametrize("kind", ["flux", "wan"])
def test_sample_images_fora_forecast_with_compare_uncached(kind, tmp_path):
    model = tiny(kind)
    png, tensors = tmp_path / "grid.png", tmp_path / "samples.safetensors"
    images, result = sample_images(
        model,
        scheduler=_scheduler(),
        fora=2,
        order=2,
        prompt_embeds=_pool(kind, 2),
        latent_size=SIDE,
        num_images=3,
        num_inference_steps=STEPS,
        guidance_scale=2.0,
        batch_size=2,
        compare_uncached=True,
        out=png,
        save_tensor=tensors,
        progress=False,
    )
    schedule = CacheSchedule.fora(STEPS, len(units(model)), 2, order=2)
    assert result.cache_usage_ratio == pytest.approx(schedule.cache_usage_ratio)
    assert result.method == "FORA N=2 forecast order 2"
    assert result.output_space == "latents" and result.num_images == 3
    assert images.dim() == 4 and images.shape[0] == 3
    assert math.isfinite(result.psnr) and result.psnr > 20
    assert result.measured_speedup is not None
    assert Image.open(png).size[0] > 0
    with safe_open(str(tensors), "pt") as f:
        assert {"samples", "latents", "uncached", "uncached_latents"} <= set(f.keys())
        latents = f.get_tensor("latents")
    setup = flow_setup(model, _scheduler(), _pool(kind, 2), 2.0, SIDE)
    assert tuple(latents.shape) == (3, *setup.sample_shape)
    torch.testing.assert_close(latents_as_images(latents), images)
    # the third image cycles back to the first prompt: same prompt, other noise
    uncached, _ = sample_images(
        model,
        scheduler=_scheduler(),
        prompt_embeds=_pool(kind, 2),
        latent_size=SIDE,
        num_images=3,
        num_inference_steps=STEPS,
        guidance_scale=2.0,
        batch_size=2,
        progress=False,
    )
    torch.testing.assert_close(uncached, result.uncached)


@pytest.mark.parametrize("with_vae", [False, True])
def test_sample_cli_on_a_flux_pipeline_folder(tmp_path, capsys, with_vae):
    model = tiny("flux")
    model.save_pretrained(tmp_path / "pipe" / "transformer")
    _scheduler().save_pretrained(tmp_path / "pipe" / "scheduler")
    if with_vae:
        _vae(2).save_pretrained(tmp_path / "pipe" / "vae")
    save_file(_pool("flux", 2), str(tmp_path / "prompts.safetensors"))
    out = tmp_path / "flux.png"
    argv = [
        "sample",
        "--model",
        str(tmp_path / "pipe"),
        "--prompt-embeds",
        str(tmp_path / "prompts.safetensors"),
        "--latent-size",
        "4",
        "--steps",
        "4",
        "--fora",
        "2",
        "--out",
        str(out),
        "--no-progress",
    ]
    assert main(argv) == 0
    assert out.is_file()
    text = capsys.readouterr().out
    assert "FluxTransformer2DModel" in text and "FORA N=2" in text
    assert ("no VAE: the PNG shows latent channels" in text) is not with_vae  # decoded with its VAE


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"scheduler": DDIMScheduler()}, "FlowMatchEulerDiscreteScheduler"),
        ({"prompt_embeds": None}, "prompt_embeds"),
        ({"prompt_embeds": {"prompt_embeds": torch.zeros(2, 5, 7)}}, r"\[P, L, 24\]"),
        (
            {
                "prompt_embeds": {
                    "prompt_embeds": torch.zeros(2, 5, 24),
                    "pooled_prompt_embeds": torch.zeros(2, 3),
                }
            },
            "pooled_prompt_embeds",
        ),
        ({"class_labels": [1]}, "not class labels"),
    ],
)
def test_bad_input_on_a_flow_family(kwargs, match):
    settings = {
        "scheduler": _scheduler(),
        "prompt_embeds": _pool("flux"),
        "latent_size": SIDE,
        "progress": False,
    }
    settings.update(kwargs)
    with pytest.raises(ValueError, match=match):
        sample_images(tiny("flux", num_layers=1), num_inference_steps=2, **settings)


def test_bare_flow_transformer_needs_a_scheduler_and_latent_size_is_for_flow_models():
    with pytest.raises(ValueError, match="FlowMatchEulerDiscreteScheduler"):
        compare(
            tiny("wan", num_layers=1), methods={"fora": ["2"]}, prompt_embeds=_pool("wan"), progress=False
        )
    with pytest.raises(ValueError, match="latent_size"):
        sample_images(tiny_dit(), scheduler=DDIMScheduler(), latent_size=4, progress=False)


def test_compare_cli_on_a_wan_transformer_folder(tmp_path, capsys):
    folder = tmp_path / "wan"
    tiny("wan", num_layers=1).save_pretrained(folder)
    _scheduler().save_config(folder)  # scheduler_config.json beside the weights
    save_file(_pool("wan", 2), str(tmp_path / "prompts.safetensors"))
    argv = [
        "compare",
        "--model",
        str(folder),
        "--prompt-embeds",
        str(tmp_path / "prompts.safetensors"),
        "--latent-size",
        "4",
        "--steps",
        "4",
        "--methods",
        "fora,pab",
        "--sweep",
        "fora=2",
        "--sweep",
        "pab=2",
        "--timing-repeats",
        "1",
        "--out",
        str(tmp_path / "report"),
        "--no-progress",
    ]
    assert main(argv) == 0
    assert "FORA N=2" in capsys.readouterr().out
    assert (tmp_path / "report" / "report.md").is_file()


def test_two_transformer_pipeline_is_refused_with_the_fix():
    class TwoStages:
        transformer = tiny("wan", num_layers=1)
        transformer_2 = tiny("wan", num_layers=1)
        scheduler = _scheduler()

    with pytest.raises(ValueError, match="pipe.transformer or pipe.transformer_2"):
        sample_images(TwoStages(), prompt_embeds=_pool("wan"), latent_size=SIDE, progress=False)


@pytest.mark.parametrize("action", ["train a router", "search a schedule"])
def test_training_and_search_refuse_a_two_transformer_pipeline(action):
    """Each would treat one stage's transformer as running every step: refused before any work."""
    from harmonica import search_schedule, train_router

    class TwoStages:
        transformer = tiny("wan", num_layers=1)
        transformer_2 = tiny("wan", num_layers=1)
        scheduler = _scheduler()

    pipe, kwargs = TwoStages(), dict(prompt_embeds=_pool("wan"), progress=False)
    calls = {
        "train a router": lambda: train_router(pipe, num_steps=4, iterations=1, **kwargs),
        "search a schedule": lambda: search_schedule(pipe, num_steps=4, target_cur=0.5, **kwargs),
    }
    with pytest.raises(ValueError, match=f"cannot {action} on this pipeline: it runs two transformers"):
        calls[action]()


def test_load_local_refuses_a_two_transformer_folder_and_reads_either_transformer(tmp_path):
    """A Wan 2.2 folder would silently run its high-noise transformer over every step: refused, naming
    both transformer folders, each of which loads with the pipeline's scheduler."""
    from harmonica.models import load_local

    for name, seed in (("transformer", 0), ("transformer_2", 1)):
        tiny("wan", num_layers=1, seed=seed).save_pretrained(tmp_path / name)
    _scheduler().save_config(tmp_path / "scheduler")
    with pytest.raises(ValueError, match=r"two transformers.*transformer_2.*fit_forecast\(pipe"):
        load_local(tmp_path)
    first, _ = load_local(tmp_path / "transformer")
    second, scheduler = load_local(tmp_path / "transformer_2")
    assert isinstance(scheduler, FlowMatchEulerDiscreteScheduler) and scheduler.config.shift == 3.0
    assert not torch.equal(first.proj_out.weight, second.proj_out.weight)


def test_load_local_reads_a_wan_folder_exactly(tmp_path):
    """Wan keeps modules in fp32, which diffusers' from_pretrained refuses without accelerate."""
    from harmonica.models import load_local

    model = tiny("wan", num_layers=1)
    model.save_pretrained(tmp_path)
    _scheduler().save_config(tmp_path)
    loaded, scheduler = load_local(tmp_path)
    assert isinstance(scheduler, FlowMatchEulerDiscreteScheduler)
    expected = model.state_dict()
    assert loaded.state_dict().keys() == expected.keys()
    assert all(torch.equal(v, expected[k]) for k, v in loaded.state_dict().items())


def _vae(latent_channels: int):
    # SD3's and FLUX.1's VAEs scale and shift their latents; DiT's only scales
    return tiny_vae(latent_channels=latent_channels, scaling_factor=1.5, shift_factor=0.2)


def _video_vae(kind: str):
    from diffusers import AutoencoderKLQwenImage, AutoencoderKLWan

    torch.manual_seed(0)
    settings = dict(
        base_dim=8, z_dim=CHANNELS, dim_mult=[1, 2], num_res_blocks=1, temperal_downsample=[False]
    )
    settings.update(latents_mean=[0.1, -0.2, 0.3, 0.0], latents_std=[1.5, 2.0, 0.5, 1.0])
    return (AutoencoderKLWan if kind == "wan" else AutoencoderKLQwenImage)(**settings).eval()


def _flux2_vae():
    from diffusers import AutoencoderKLFlux2

    torch.manual_seed(0)
    vae = AutoencoderKLFlux2(
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(8, 8),
        layers_per_block=1,
        norm_num_groups=4,
        latent_channels=2,  # 2x2 patches: 8 token channels
    ).eval()
    with torch.no_grad():  # batch-norm statistics the decode must apply
        vae.bn.running_mean.copy_(torch.linspace(-0.5, 0.5, 8))
        vae.bn.running_var.copy_(torch.linspace(0.5, 2.0, 8))
    return vae


def _pipeline_with_vae(kind: str):
    from diffusers import (
        Flux2Pipeline,
        FluxPipeline,
        QwenImagePipeline,
        StableDiffusion3Pipeline,
        WanPipeline,
    )

    none = dict(text_encoder=None, tokenizer=None)
    if kind == "flux2":
        return Flux2Pipeline(scheduler=_scheduler(), transformer=tiny(kind), vae=_flux2_vae(), **none)
    if kind == "wan":
        return WanPipeline(scheduler=_scheduler(), transformer=tiny(kind), vae=_video_vae(kind), **none)
    if kind == "qwen":
        return QwenImagePipeline(scheduler=_scheduler(), transformer=tiny(kind), vae=_video_vae(kind), **none)
    none.update(text_encoder_2=None, tokenizer_2=None)
    if kind == "flux":  # packed tokens: 4 VAE channels per token channel group
        return FluxPipeline(scheduler=_scheduler(), transformer=tiny(kind), vae=_vae(2), **none)
    return StableDiffusion3Pipeline(
        scheduler=_scheduler(),
        transformer=tiny(kind),
        vae=_vae(4),
        text_encoder_3=None,
        tokenizer_3=None,
        **none,
    )


@pytest.mark.parametrize("kind", ["sd3", "flux", "flux2", "wan", "qwen"])
def test_latents_are_decoded_as_the_pipeline_decodes_them(kind):
    """compare's decoder against diffusers' own pipeline: its latent output decoded here equals its
    image output (postprocessed to [0, 1]) from the same seed (Wan: frames stacked vertically)."""
    from harmonica.compare import _decoder

    pipe = _pipeline_with_vae(kind)
    pipe.set_progress_bar_config(disable=True)
    text, pooled = prompts(1)
    inputs = dict(prompt_embeds=text, num_inference_steps=2, height=16, width=16)
    if kind in ("sd3", "flux"):
        inputs.update(pooled_prompt_embeds=pooled)
    if kind == "sd3":
        inputs.update(negative_prompt_embeds=torch.zeros_like(text), negative_pooled_prompt_embeds=pooled * 0)
    if kind == "wan":
        inputs.update(num_frames=2, negative_prompt_embeds=torch.zeros_like(text))
    if kind == "qwen":
        inputs.update(prompt_embeds_mask=torch.ones(1, text.shape[1], dtype=torch.long))

    def run(output_type):
        result = pipe(**inputs, output_type=output_type, generator=torch.Generator().manual_seed(0))
        return result.frames if kind == "wan" else result.images

    latents, images = run("latent"), run("pt")
    assert latents.dim() == {"sd3": 4, "flux": 3, "flux2": 3, "wan": 5, "qwen": 3}[kind]
    if kind == "wan":  # [B, F, C, H, W] -> [B, C, F·H, W]
        images = images.permute(0, 2, 1, 3, 4).flatten(2, 3)
    torch.testing.assert_close(_decoder(pipe.vae)(latents), images * 2 - 1, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["sd3", "flux", "flux2", "wan"])
def test_compare_on_a_pipeline_with_its_vae_reports_pixels(kind):
    pipe = _pipeline_with_vae(kind)
    report = _compare(pipe, kind, [method_from_spec("fora", 2)])
    assert report.context["output_space"] == "pixels"
    row = report.row("FORA N=2")
    assert row.status == "ok" and row.psnr is not None and math.isfinite(row.psnr)


def test_a_corrupted_vae_config_in_a_flow_folder_is_named(tmp_path):
    tiny("flux").save_pretrained(tmp_path / "pipe" / "transformer")
    _scheduler().save_pretrained(tmp_path / "pipe" / "scheduler")
    (tmp_path / "pipe" / "vae").mkdir()
    (tmp_path / "pipe" / "vae" / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"vae/config.json is not a readable diffusers VAE config"):
        sample_images(tmp_path / "pipe", prompt_embeds=_pool("flux", 2), latent_size=4, num_inference_steps=2)
