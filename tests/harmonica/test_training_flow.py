"""Router training on the flow-matching families (tiny random FLUX.1, FLUX.2, SD3, Wan, Qwen-Image):
FlowMatchEulerDiscreteScheduler (velocity prediction), prompt-embedding pools, true CFG and FLUX's
guidance-distilled conditioning."""

from __future__ import annotations

import math

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from harmonica import Router, disable_cache, enable_cache, train_router, units
from harmonica.cache import attach_handle
from harmonica.training import _FlowConditioning, _Group, _RoutedHandle, _sample, _Setup

from .family_models import FAMILIES, euler, noise, prompts, tiny

STEPS = 4


def flow_scheduler() -> FlowMatchEulerDiscreteScheduler:
    return FlowMatchEulerDiscreteScheduler(shift=3.0)


def _train(kind: str, **overrides):
    text, pooled = prompts(3)
    settings = dict(
        num_steps=STEPS,
        iterations=2 * (STEPS - 1),
        batch_size=2,
        guidance_scale=1.0 if kind.startswith("flux") else 3.0,  # FLUX is guidance-distilled
        prompt_embeds=text,
        pooled_prompt_embeds=pooled if kind in ("flux", "sd3") else None,
        latent_size=4,
        lambda_every=2,
        progress=False,
    )
    settings.update(overrides)
    model = tiny(kind)
    return model, train_router(model, flow_scheduler(), **settings)


@pytest.mark.parametrize("kind", FAMILIES)
def test_router_trains_on_flow_matching_and_enables(kind, tmp_path):
    model, result = _train(kind, target_cur=0.3)
    router = result.router
    assert router.logits.shape == (STEPS, len(units(model)))
    assert router.sampler["class"] == "FlowMatchEulerDiscreteScheduler"
    assert all(math.isfinite(r["loss"]) and math.isfinite(r["lambda_mean"]) for r in result.history)
    path = tmp_path / "router.safetensors"
    router.save(path)
    loaded = Router.load(path, model=model)
    text, pooled = prompts(1)
    with torch.no_grad():
        enable_cache(model, loaded)
        euler(kind, model, noise(kind, 1), text, pooled, STEPS)
    disable_cache(model)


def test_flow_sampling_in_training_restarts_mid_trajectory_at_the_right_step():
    """λ's sampling runs restart from a stored state at step k: a flow-matching Euler scheduler (which
    counts its steps) must step from sigma_k there, so a restarted run equals the uninterrupted one."""
    kind = "sd3"
    model = tiny(kind)
    text, pooled = prompts(2)
    handle = _RoutedHandle(model, STEPS, 0.1)
    attach_handle(model, handle)
    conditioning = _FlowConditioning(model, text, pooled, None, None, 4, None)
    setup = _Setup(model, handle, flow_scheduler(), conditioning, True, 3.0, torch.device("cpu"), _Group())
    x = torch.randn(2, *conditioning.sample_shape, generator=torch.Generator().manual_seed(0))
    cond = torch.tensor([1, 0])
    probabilities = torch.ones(STEPS, len(units(model)))
    states = {}
    full = _sample(
        setup, x, cond, probabilities, lambda i: False, on_step=lambda i, s: states.setdefault(i, s)
    )
    timesteps = setup.scheduler.timesteps.clone()
    restarted = _sample(setup, states[2], cond, probabilities, lambda i: False, start=2, timesteps=timesteps)
    torch.testing.assert_close(restarted, full, rtol=1e-5, atol=1e-5)
    disable_cache(model)


def test_flow_families_need_a_prompt_pool():
    with pytest.raises(ValueError, match="pool of prompt embeddings: pass prompt_embeds"):
        train_router(tiny("wan"), flow_scheduler(), num_steps=STEPS, iterations=1, progress=False)
    with pytest.raises(ValueError, match="latent_size"):
        _train("wan", latent_size=0)


@pytest.mark.parametrize("kind", ["flux", "sd3"])
def test_schedule_search_on_flow_matching(kind):
    from harmonica import search_schedule

    model = tiny(kind)
    text, pooled = prompts(3)
    result = search_schedule(
        model,
        flow_scheduler(),
        num_steps=STEPS,
        target_cur=0.25,
        batch_size=2,
        guidance_scale=1.0 if kind == "flux" else 3.0,
        prompt_embeds=text,
        pooled_prompt_embeds=pooled,
        latent_size=4,
        progress=False,
    )
    assert result.schedule.cache_usage_ratio == pytest.approx(0.25)
    assert result.schedule.num_units == len(units(model))


@pytest.mark.parametrize("kind", ["flux", "wan"])
def test_forecast_fit_and_search_on_flow_matching(kind):
    from harmonica import CacheSchedule, fit_forecast, search_schedule

    model = tiny(kind)
    text, pooled = prompts(3)
    conditions = dict(
        guidance_scale=1.0 if kind == "flux" else 3.0,
        prompt_embeds=text,
        pooled_prompt_embeds=pooled if kind == "flux" else None,
        latent_size=4,
        progress=False,
    )
    steps = 6
    schedule = CacheSchedule.fora(steps, len(units(model)), 2, order=2, warmup=1)
    fit = fit_forecast(model, flow_scheduler(), schedule, batch_size=2, **conditions)
    assert fit.schedule.compute.equal(schedule.compute) and fit.schedule.forecasts
    assert not torch.equal(fit.schedule.coefficients, schedule.coefficients)
    found = search_schedule(
        model,
        flow_scheduler(),
        num_steps=steps,
        target_cur=1 / 3,
        forecast_order=1,
        batch_size=2,
        **conditions,
    )
    assert found.schedule.cache_usage_ratio == pytest.approx(1 / 3) and found.schedule.forecasts


def test_sd3_trains_at_its_native_size_unless_told_otherwise():
    """As ``harmonica compare`` samples it: SD3's sample_size / patch_size image tokens per side
    (32 for the other families), so a router trains at the resolution it is compared at."""
    from harmonica.training import _conditioning_for

    text, pooled = prompts(2)
    sd3 = tiny("sd3")  # sample_size 8, patch 2, pos_embed_max_size 16
    shape = _conditioning_for(sd3, None, text, None, None, None, pooled).shape
    assert tuple(shape)[-2:] == (8, 8)
    assert tuple(_conditioning_for(sd3, None, text, None, None, None, pooled, latent_size=6).shape)[-2:] == (
        12,
        12,
    )
    flux = tiny("flux")
    assert _conditioning_for(flux, None, text, None, None, None, pooled).shape[-2] == 32 * 32
    _, result = _train("sd3", latent_size=None, target_cur=0.3)
    assert result.router.logits.shape[0] == STEPS


def test_train_search_and_fit_commands_take_the_prompt_pool_and_latent_size(tmp_path, capsys):
    from diffusers import DDIMScheduler
    from safetensors.torch import save_file

    from harmonica.cli import main

    from .tiny_models import tiny_dit

    tiny("flux").save_pretrained(tmp_path / "pipe" / "transformer")
    flow_scheduler().save_pretrained(tmp_path / "pipe" / "scheduler")
    text, pooled = prompts(2)
    save_file({"prompt_embeds": text, "pooled_prompt_embeds": pooled}, str(tmp_path / "prompts.safetensors"))
    common = ["--model", str(tmp_path / "pipe"), "--prompt-embeds", str(tmp_path / "prompts.safetensors")]
    common += ["--latent-size", "2", "--steps", "6", "--guidance", "1", "--batch", "2"]
    train = [
        "train",
        *common,
        "--iterations",
        "2",
        "--exchanges",
        "0",
        "--out",
        str(tmp_path / "r.safetensors"),
    ]
    assert main(train) == 0
    fit = ["fit", *common, "--fora", "2", "--out", str(tmp_path / "f.safetensors")]
    assert main(fit) == 0
    search = ["search", *common, "--target-cur", "0.3", "--out", str(tmp_path / "s.safetensors")]
    assert main(search) == 0
    model = tiny("flux")
    for name in ("r", "f", "s"):
        Router.load(tmp_path / f"{name}.safetensors", model=model)

    tiny_dit().save_pretrained(tmp_path / "dit")
    DDIMScheduler().save_pretrained(tmp_path / "dit")
    capsys.readouterr()
    dit = ["fit", "--model", str(tmp_path / "dit"), "--fora", "2", "--latent-size", "4"]
    with pytest.raises(SystemExit):
        main([*dit, "--out", str(tmp_path / "x.safetensors")])
    assert "--latent-size applies to the flow-matching families" in capsys.readouterr().err
