"""The adapters beyond DiT/PixArt on tiny random FLUX.1, FLUX.2, SD3 (with SD3.5 dual attention), Wan
and Qwen-Image transformers, sampled with a flow-matching Euler loop."""

from __future__ import annotations

import copy
import os
from collections import Counter

import pytest
import torch

import harmonica_kernels as hk
from harmonica import CacheSchedule, disable_cache, enable_cache, units
from harmonica.adapters import adapter_for
from harmonica.adapters.base import project_chunks
from harmonica.cache import CacheStateError, ScheduleMismatchError
from harmonica.models import UnsupportedModelError, fingerprint, flop_profile

from .family_models import FAMILIES, ReplayOracle, euler, noise, predict, prompts, tiny, unit_outputs

STEPS = 4
# The fused residual + LayerNorm sums in another order than torch's LayerNorm: fp32 rounding only.
FP32 = dict(rtol=1e-5, atol=1e-5)


@pytest.fixture(autouse=True)
def op_backend():
    with hk.use_backend(os.environ.get("HARMONICA_BACKEND", "torch")):
        yield


def random_schedule(num_units: int, seed: int = 0, steps: int = STEPS) -> CacheSchedule:
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(steps, num_units, generator=g) > 0.5
    mask[0] = True
    return CacheSchedule.from_mask(mask)


def oracle_sample(kind, model, schedule, latents, text, pooled, guidance=1.0, separate_cfg=False):
    oracle = ReplayOracle(kind, model, schedule.compute, calls_per_step=2 if separate_cfg else 1)
    try:
        return euler(kind, model, latents, text, pooled, schedule.num_steps, guidance, separate_cfg)
    finally:
        oracle.remove()


def guidance_of(kind: str) -> float:
    # FLUX is guidance-distilled (no CFG batch); SD3, Wan and Qwen-Image sample with true CFG.
    return 1.0 if kind in ("flux", "flux2") else 3.0


@pytest.mark.parametrize("kind", FAMILIES)
def test_units_follow_the_blocks_branches(kind):
    model = tiny(kind)
    assert units(model) == [name for name, _, _ in unit_outputs(kind, model)]
    if kind == "sd3":  # block 0: SD3.5 dual attention; last block: context_pre_only
        assert "blocks.0.attn2" in units(model) and "blocks.1.ff_context" not in units(model)


@pytest.mark.parametrize("kind", FAMILIES)
def test_full_schedule_forward_matches_stock(kind):
    model = tiny(kind)
    text, pooled = prompts(2)
    x, t = noise(kind, 2), torch.tensor(700.0)
    with torch.no_grad():
        expected = predict(kind, model, x, t, text, pooled)
        enable_cache(model, CacheSchedule.full(1, len(units(model))))
        got = predict(kind, model, x, t, text, pooled)
    torch.testing.assert_close(got, expected, **FP32)


@pytest.mark.parametrize("kind", FAMILIES)
@pytest.mark.parametrize("schedule_name", ["full", "fora2", "fora3", "random"])
def test_euler_loop_matches_replay_oracle(kind, schedule_name):
    model = tiny(kind)
    num_units = len(units(model))
    schedule = {
        "full": CacheSchedule.full(STEPS, num_units),
        "fora2": CacheSchedule.fora(STEPS, num_units, 2),
        "fora3": CacheSchedule.fora(STEPS, num_units, 3),
        "random": random_schedule(num_units),
    }[schedule_name]
    text, pooled = prompts(2)
    latents = noise(kind, 2)
    guidance = guidance_of(kind)
    with torch.no_grad():
        expected = oracle_sample(kind, model, schedule, latents, text, pooled, guidance)
        handle = enable_cache(model, schedule)
        got = euler(kind, model, latents, text, pooled, STEPS, guidance)
    assert handle.step == STEPS
    torch.testing.assert_close(got, expected, **FP32)


@pytest.mark.parametrize("kind", FAMILIES)
def test_cfg_as_two_calls_per_step_keeps_a_cache_per_call(kind):
    """Pipelines that call the transformer for the conditional and unconditional halves separately,
    on the same latents at the same timestep: one step, two branches, each with its own caches."""
    model = tiny(kind)
    schedule = random_schedule(len(units(model)), seed=7)
    text, pooled = prompts(2)
    with torch.no_grad():
        expected = oracle_sample(kind, model, schedule, noise(kind, 2), text, pooled, 3.0, separate_cfg=True)
        handle = enable_cache(model, schedule)
        got = euler(kind, model, noise(kind, 2), text, pooled, STEPS, 3.0, separate_cfg=True)
        assert handle.step == STEPS
        again = euler(kind, model, noise(kind, 2), text, pooled, STEPS, 3.0, separate_cfg=True)
        batched = euler(
            kind, model, noise(kind, 2), text, pooled, STEPS, 3.0
        )  # a new generation, CFG batched
    torch.testing.assert_close(got, expected, **FP32)
    assert torch.equal(got, again)
    torch.testing.assert_close(batched, got, **FP32)  # same maths, one call per step


@pytest.mark.parametrize("kind", FAMILIES)
@pytest.mark.parametrize("order", [1, 2])
def test_forecast_schedules_match_replay_oracle(kind, order):
    """Forecasting (issue 14) lives in the CacheHandle; every family's units go through it, the joint
    attentions' two streams and CFG run as separate calls included."""
    model = tiny(kind)
    steps = 7
    schedule = CacheSchedule.fora(steps, len(units(model)), 2, order=order)
    assert schedule.forecasts
    text, pooled = prompts(2)
    latents = noise(kind, 2)
    separate = kind != "flux"
    guidance = 3.0 if separate else 1.0
    oracle = ReplayOracle(
        kind, model, schedule.compute, 2 if separate else 1, schedule.orders, schedule.coefficients
    )
    with torch.no_grad():
        try:
            expected = euler(kind, model, latents, text, pooled, steps, guidance, separate_cfg=separate)
        finally:
            oracle.remove()
        enable_cache(model, schedule)
        got = euler(kind, model, latents, text, pooled, steps, guidance, separate_cfg=separate)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kind", FAMILIES)
def test_random_masks_match_replay_oracle(kind):
    model = tiny(kind)
    num_units = len(units(model))
    text, pooled = prompts(1)
    latents = noise(kind, 1)
    for seed in (1, 2, 3):
        schedule = random_schedule(num_units, seed=seed, steps=5)
        with torch.no_grad():
            expected = oracle_sample(kind, model, schedule, latents, text, pooled)
            enable_cache(model, schedule)
            got = euler(kind, model, latents, text, pooled, 5)
            disable_cache(model)
        torch.testing.assert_close(got, expected, **FP32)


@pytest.mark.parametrize("kind", FAMILIES)
def test_reused_units_are_not_called(kind):
    """FLOPs fall as the schedule says: a unit's module runs exactly at the steps that compute it
    (a joint attention when either of its streams is computed)."""
    model = tiny(kind)
    num_units = len(units(model))
    schedule = random_schedule(num_units, seed=4)
    calls: Counter = Counter()
    modules = {}
    for k, (_, module, _) in enumerate(unit_outputs(kind, model)):
        modules.setdefault(module, []).append(k)
    hooks = [m.register_forward_pre_hook(lambda m, a: calls.update([m])) for m in modules]
    text, pooled = prompts(1)
    with torch.no_grad():
        enable_cache(model, schedule)
        euler(kind, model, noise(kind, 1), text, pooled, STEPS)
    for hook in hooks:
        hook.remove()
    compute = schedule.compute
    for module, ks in modules.items():
        assert calls[module] == int(compute[:, ks].any(dim=1).sum())


@pytest.mark.parametrize("kind", FAMILIES)
def test_repeated_generations_are_identical(kind):
    model = tiny(kind)
    schedule = CacheSchedule.fora(STEPS, len(units(model)), 2)
    text, pooled = prompts(2)
    with torch.no_grad():
        enable_cache(model, schedule)
        first = euler(kind, model, noise(kind, 2), text, pooled, STEPS, guidance_of(kind))
        # a new generation starts by itself: the timestep goes back up
        second = euler(kind, model, noise(kind, 2), text, pooled, STEPS, guidance_of(kind))
    assert torch.equal(first, second)


@pytest.mark.parametrize("kind", FAMILIES)
def test_batch_and_resolution_change_between_generations(kind):
    model = tiny(kind)
    schedule = random_schedule(len(units(model)), seed=5)
    cases = [(2, 4), (3, 2), (1, 6)]  # (batch, image tokens per side)
    with torch.no_grad():
        expected = []
        for batch, side in cases:
            text, pooled = prompts(batch)
            expected.append(oracle_sample(kind, model, schedule, noise(kind, batch, side), text, pooled))
        handle = enable_cache(model, schedule)
        for (batch, side), want in zip(cases, expected, strict=True):
            text, pooled = prompts(batch)
            got = euler(kind, model, noise(kind, batch, side), text, pooled, STEPS)
            torch.testing.assert_close(got, want, **FP32)
        # within one generation a shape change is an error
        handle.reset()
        text, pooled = prompts(1)
        predict(kind, model, noise(kind, 1), torch.tensor(900.0), text, pooled)
        with pytest.raises(CacheStateError, match="allocated at step 0"):
            predict(kind, model, noise(kind, 1, side=2), torch.tensor(800.0), text, pooled)


@pytest.mark.parametrize("kind", FAMILIES)
def test_disable_restores_modules_and_outputs(kind):
    model = tiny(kind)
    lists = [getattr(model, name) for name, _ in adapter_for(model).block_lists]
    originals = [list(blocks) for blocks in lists]
    state = {k: v.clone() for k, v in model.state_dict().items()}
    text, pooled = prompts(2)
    with torch.no_grad():
        stock = euler(kind, model, noise(kind, 2), text, pooled, STEPS)
        enable_cache(model, CacheSchedule.fora(STEPS, len(units(model)), 2))
        assert model.state_dict().keys() == state.keys()  # same parameter names while cached
        assert all(a is not b for a, b in zip(lists[0], originals[0], strict=True))
        euler(kind, model, noise(kind, 2), text, pooled, STEPS)
        disable_cache(model)
        again = euler(kind, model, noise(kind, 2), text, pooled, STEPS)
    for blocks, before in zip(lists, originals, strict=True):
        assert all(a is b for a, b in zip(blocks, before, strict=True))
    assert type(model) is type(tiny(kind, num_layers=1))
    assert "_harmonica_cache" not in model.__dict__
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert torch.equal(again, stock)


@pytest.mark.parametrize("kind", FAMILIES)
def test_flop_profile_and_ideal_speedup(kind):
    model = tiny(kind)
    num_units = len(units(model))
    profile = flop_profile(model)
    assert len(profile.units) == num_units and all(f > 0 for f in profile.units) and profile.always > 0
    assert CacheSchedule.full(10, num_units).ideal_speedup(model) == pytest.approx(1.0)
    fora2 = CacheSchedule.fora(10, num_units, 2).ideal_speedup(model)
    fora3 = CacheSchedule.fora(10, num_units, 3).ideal_speedup(model)
    assert 1.5 < fora2 < 2.0 < fora3 < 3.0
    fp = fingerprint(model)
    assert fp["units"] == units(model) and fp["class"] == type(model).__name__


def test_joint_attention_flops_split_between_its_two_streams():
    model = tiny("flux")
    profile = flop_profile(model)
    names = units(model)
    image, text = (
        profile.units[names.index("blocks.0.attn")],
        profile.units[names.index("blocks.0.attn_context")],
    )
    # 4096 image tokens against 120 text tokens: the image stream carries nearly all of it
    assert 0 < text < image and image / text == pytest.approx(4096 / 120, rel=0.05)


def test_one_stream_of_a_joint_attention_computed_alone():
    """FLUX attn computed, attn_context reused (and the reverse): each stream keeps its own cache."""
    kind = "flux"
    model = tiny(kind, num_layers=1)
    names = units(model)
    mask = torch.ones(STEPS, len(names), dtype=torch.bool)
    mask[1, names.index("blocks.0.attn_context")] = False
    mask[2, names.index("blocks.0.attn")] = False
    mask[3, names.index("blocks.0.attn_context")] = False
    mask[3, names.index("single_blocks.0.joint")] = False
    schedule = CacheSchedule.from_mask(mask)
    text, pooled = prompts(2)
    with torch.no_grad():
        expected = oracle_sample(kind, model, schedule, noise(kind, 2), text, pooled)
        enable_cache(model, schedule)
        got = euler(kind, model, noise(kind, 2), text, pooled, STEPS)
    torch.testing.assert_close(got, expected, **FP32)


@pytest.mark.parametrize("kind", FAMILIES)
def test_compiled_steps_fullgraph_match_eager(kind):
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    model = tiny(kind, num_layers=1)
    handle = enable_cache(model, CacheSchedule.fora(STEPS, len(units(model)), 2))
    text, pooled = prompts(2)
    # FLUX: CFG as two calls per step (two branches of caches); the others: CFG batched
    separate = kind == "flux"
    with torch.no_grad():
        eager = euler(kind, model, noise(kind, 2), text, pooled, STEPS, 3.0, separate_cfg=separate)
        counter = CompileCounterWithBackend("eager")
        compiled = torch.compile(model, backend=counter, fullgraph=True)
        handle.reset()
        got = euler(kind, compiled, noise(kind, 2), text, pooled, STEPS, 3.0, separate_cfg=separate)
        again = euler(kind, compiled, noise(kind, 2), text, pooled, STEPS, 3.0, separate_cfg=separate)
    assert counter.frame_count == 2  # one graph per distinct schedule row
    torch.testing.assert_close(got, eager, rtol=0, atol=0)
    assert torch.equal(got, again)


@pytest.mark.parametrize("kind", FAMILIES)
def test_bf16_matches_replay_oracle(kind):
    model = tiny(kind).to(torch.bfloat16)
    schedule = CacheSchedule.fora(STEPS, len(units(model)), 2)
    text, pooled = (p.to(torch.bfloat16) for p in prompts(2))
    latents = noise(kind, 2).to(torch.bfloat16)
    with torch.no_grad():
        expected = oracle_sample(kind, model, schedule, latents, text, pooled)
        enable_cache(model, schedule)
        got = euler(kind, model, latents, text, pooled, STEPS)
    torch.testing.assert_close(got.float(), expected.float(), rtol=3e-2, atol=3e-2)


def test_deepcopy_of_a_cached_model_is_independent():
    kind = "wan"
    model = tiny(kind)
    handle = enable_cache(model, CacheSchedule.fora(STEPS, len(units(model)), 2))
    clone = copy.deepcopy(model)
    assert clone._harmonica_cache is not handle
    assert clone.blocks[0]._handle is clone._harmonica_cache
    text, pooled = prompts(1)
    with torch.no_grad():
        a = euler(kind, model, noise(kind, 1), text, pooled, STEPS)
        b = euler(kind, clone, noise(kind, 1), text, pooled, STEPS)
    assert torch.equal(a, b)
    disable_cache(clone)
    assert model.blocks[0]._handle is handle


def test_unsupported_transformer_names_the_families_and_how_to_add_one():
    class Custom(torch.nn.Module):
        pass

    with pytest.raises(UnsupportedModelError) as err:
        enable_cache(Custom(), CacheSchedule.full(2, 2))
    message = str(err.value)
    for name in (
        "DiTTransformer2DModel",
        "FluxTransformer2DModel",
        "SD3Transformer2DModel",
        "Wan",
        "QwenImage",
    ):
        assert name in message
    assert "adapter" in message and "BlockAdapter" in message


def test_wan_per_token_timesteps_are_refused():
    model = tiny("wan")
    enable_cache(model, CacheSchedule.full(1, len(units(model))))
    text, _ = prompts(1)
    x = noise("wan", 1)
    tokens = 2 * 4 * 4
    with torch.no_grad(), pytest.raises(UnsupportedModelError, match="per-token timesteps"):
        model(hidden_states=x, timestep=torch.full((1, tokens), 900.0), encoder_hidden_states=text)


@pytest.mark.parametrize("needed", [(True,) * 6, (False,) * 2 + (True,) * 4, (False,) * 3 + (True,) * 3])
def test_project_chunks_matches_the_full_projection(needed):
    linear = torch.nn.Linear(7, 6 * 5)
    emb = torch.randn(3, 7)
    expected = linear(emb).chunk(6, dim=1)
    for chunk, want, live in zip(project_chunks(linear, emb, 6, needed), expected, needed, strict=True):
        if live:
            torch.testing.assert_close(chunk, want, **FP32)
        else:
            assert chunk is None


# ---------------------------------------------------------------------------------------------
# Wan 2.2: two transformers in one pipeline


def wan22_pipeline(same_weights: bool = False):
    from diffusers import FlowMatchEulerDiscreteScheduler, WanPipeline

    transformer = tiny("wan", seed=0)
    return WanPipeline(
        tokenizer=None,
        text_encoder=None,
        vae=None,  # latents out: no decoder needed
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        transformer=transformer,
        transformer_2=copy.deepcopy(transformer) if same_weights else tiny("wan", seed=1),
        boundary_ratio=0.875,
    )


def wan22_call(pipe, steps: int = 6, guidance: float = 1.0):
    text, _ = prompts(1)
    return pipe(
        prompt_embeds=text,
        negative_prompt_embeds=torch.zeros_like(text),
        num_inference_steps=steps,
        height=32,
        width=32,
        num_frames=5,
        guidance_scale=guidance,  # > 1: the pipeline makes two transformer calls per step
        output_type="latent",
        generator=torch.Generator().manual_seed(0),
    ).frames


@pytest.mark.parametrize("guidance", [1.0, 4.0])
def test_wan22_one_schedule_per_transformer_matches_replay_oracle(guidance):
    from harmonica.cache import stage_steps

    pipe = wan22_pipeline()
    high, low = stage_steps(pipe, 6)
    assert (high, low) == (2, 4)
    num_units = len(units(pipe.transformer))
    schedules = (CacheSchedule.full(high, num_units), random_schedule(num_units, seed=6, steps=low))
    calls = 2 if guidance > 1 else 1
    with torch.no_grad():
        oracles = [ReplayOracle("wan", pipe.transformer, schedules[0].compute, calls)]
        oracles.append(ReplayOracle("wan", pipe.transformer_2, schedules[1].compute, calls))
        expected = wan22_call(pipe, guidance=guidance)
        for oracle in oracles:
            oracle.remove()
        handles = enable_cache(pipe, schedules)
        got = wan22_call(pipe, guidance=guidance)
        assert [h.step for h in handles] == [high, low]
        again = wan22_call(pipe, guidance=guidance)
    torch.testing.assert_close(got, expected, **FP32)
    assert torch.equal(got, again)
    disable_cache(pipe)
    assert "set_timesteps" not in pipe.scheduler.__dict__
    for transformer in (pipe.transformer, pipe.transformer_2):
        assert "_harmonica_cache" not in transformer.__dict__
        assert not any("Cached" in type(b).__name__ for b in transformer.blocks)


def test_wan22_schedules_for_the_wrong_transformer_are_refused_with_both_sizes():
    pipe = wan22_pipeline()
    num_units = len(units(pipe.transformer))
    swapped = {
        "transformer": CacheSchedule.fora(4, num_units, 2),
        "transformer_2": CacheSchedule.fora(2, num_units, 2),
    }
    enable_cache(pipe, swapped)
    sizes = r"2 on transformer and 4 on transformer_2.*4 steps.*2 steps.*swapped"
    with torch.no_grad(), pytest.raises(ScheduleMismatchError, match=sizes):
        wan22_call(pipe)
    disable_cache(pipe)
    with pytest.raises(TypeError, match="two transformers.*one schedule or router for each"):
        enable_cache(pipe, CacheSchedule.fora(6, num_units, 2))
    assert "_harmonica_cache" not in pipe.transformer.__dict__


def _stage_schedule(mask: list[int], num_units: int) -> CacheSchedule:
    return CacheSchedule.from_mask(torch.tensor(mask, dtype=torch.bool)[:, None].expand(-1, num_units))


def test_wan22_fit_forecast_fits_both_transformers_on_one_run():
    """With transformer_2 a copy of transformer, the two-stage fit equals the one-transformer fit of the
    schedules laid end to end: the low-noise schedule starts with three computes, so its forecasts
    read the same history whether the caches carry over (one transformer) or start empty (two)."""
    from harmonica import fit_forecast
    from harmonica.cache import stage_steps

    pipe = wan22_pipeline(same_weights=True)
    assert stage_steps(pipe, 12) == (4, 8)
    num_units = len(units(pipe.transformer))
    high = _stage_schedule([1, 1, 0, 1], num_units).with_forecast(2)
    low = _stage_schedule([1, 1, 1, 0, 1, 0, 0, 1], num_units).with_forecast(2)
    whole = _stage_schedule([1, 1, 0, 1, 1, 1, 1, 0, 1, 0, 0, 1], num_units).with_forecast(2)
    assert whole.orders.equal(torch.cat([high.orders, low.orders]))
    kwargs = dict(
        prompt_embeds=prompts(3)[0], latent_size=4, batch_size=2, guidance_scale=4.0, progress=False
    )
    fits = fit_forecast(pipe, schedule={"transformer": high, "transformer_2": low}, **kwargs)
    alone = fit_forecast(pipe.transformer, pipe.scheduler, whole, **kwargs)
    coefficients = torch.cat([fit.schedule.coefficients for fit in fits])
    torch.testing.assert_close(coefficients, alone.schedule.coefficients, rtol=1e-6, atol=1e-7)
    assert not torch.allclose(coefficients, whole.coefficients)  # fitted, not the rule's
    residual = torch.cat([fit.residual for fit in fits])
    assert torch.equal(residual.isnan(), alone.residual.isnan())
    for fit, given in zip(fits, (high, low), strict=True):
        assert fit.rule_schedule is given and fit.schedule.compute.equal(given.compute)
    handles = enable_cache(pipe, tuple(fit.schedule for fit in fits))
    with torch.no_grad():
        wan22_call(pipe, steps=12, guidance=4.0)
    assert [h.step for h in handles] == [4, 8]
    disable_cache(pipe)


def test_wan22_fit_forecast_guides_each_stage_with_its_scale_and_checks_sizes():
    from harmonica import fit_forecast

    pipe = wan22_pipeline()
    num_units = len(units(pipe.transformer))
    high = CacheSchedule.fora(4, num_units, 2, order=1)
    low = CacheSchedule.fora(8, num_units, 2, order=2)
    batches = {0: [], 1: []}
    hooks = [
        model.register_forward_pre_hook(
            lambda _, args, kw, i=i: batches[i].append(kw["hidden_states"].shape[0]), with_kwargs=True
        )
        for i, model in enumerate((pipe.transformer, pipe.transformer_2))
    ]
    kwargs = dict(prompt_embeds=prompts(3)[0], latent_size=4, batch_size=2, progress=False)
    fits = fit_forecast(pipe, schedule=(high, low), guidance_scale=4.0, guidance_scale_2=1.0, **kwargs)
    for hook in hooks:
        hook.remove()
    assert batches == {0: [4] * 4, 1: [2] * 8}  # CFG doubles the batch of the high-noise stage only
    assert all(torch.isfinite(fit.residual).any() for fit in fits)
    with pytest.raises(ValueError, match="run 4 on transformer and 8 on transformer_2.*8 and 4 steps"):
        fit_forecast(pipe, schedule=(low, high), **kwargs)
    with pytest.raises(TypeError, match="pass one schedule for each"):
        fit_forecast(pipe, schedule=high, **kwargs)
    with pytest.raises(ValueError, match="forecasts no entry"):
        fit_forecast(
            pipe,
            schedule=(CacheSchedule.fora(4, num_units, 2), CacheSchedule.fora(8, num_units, 2)),
            **kwargs,
        )
    with pytest.raises(ValueError, match="schedule for transformer_2 has"):
        fit_forecast(pipe, schedule=(high, CacheSchedule.fora(8, num_units + 1, 2, order=1)), **kwargs)


def test_compare_and_sample_name_what_they_drive():
    from diffusers import FlowMatchEulerDiscreteScheduler

    from harmonica.compare import compare

    # compare drives the flow-matching families too; without prompts it names what it needs
    with pytest.raises(ValueError, match="SD3Transformer2DModel is text-conditioned: pass prompt_embeds"):
        compare(tiny("sd3"), scheduler=FlowMatchEulerDiscreteScheduler(), num_inference_steps=STEPS)
