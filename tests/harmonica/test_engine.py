"""The inference engine: enable_cache / disable_cache on tiny random DiT and PixArt models."""

from __future__ import annotations

import copy
import os
from collections import Counter

import pytest
import torch
from diffusers import DiTTransformer2DModel, EulerDiscreteScheduler

import harmonica_kernels as hk
from harmonica import CacheSchedule, Router, disable_cache, enable_cache, units
from harmonica.cache import CachedTransformerBlock, CacheStateError, ScheduleMismatchError, _ada_zero_chunks
from harmonica.models import UnsupportedModelError, tie_dit_embedders
from harmonica.router import RouterMismatchError

from .tiny_models import (
    CAPTION_CHANNELS,
    CHANNELS,
    LATENT,
    TEXT_TOKENS,
    ReferenceCache,
    ddim,
    dit_pipeline,
    pixart_pipeline,
    prompt_kwargs,
    sample,
    tiny_dit,
    tiny_pixart,
)

STEPS = 4
FP32 = dict(rtol=1e-5, atol=1e-5)
# bf16 activations: harmonica rounds each fused residual once, diffusers twice.
BF16 = dict(rtol=3e-2, atol=3e-2)


def _has_transformers() -> bool:
    try:
        import transformers  # noqa: F401
    except ImportError:
        return False
    return True


def make_model(kind: str, **overrides):
    return tiny_dit(**overrides) if kind == "dit" else tiny_pixart(**overrides)


def make_cond(kind: str, batch: int, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    if kind == "dit":
        return torch.randint(0, 1000, (batch,), generator=g), None
    mask = torch.ones(batch, TEXT_TOKENS, dtype=torch.long)
    mask[:, -1] = 0
    return torch.randn(batch, TEXT_TOKENS, CAPTION_CHANNELS, generator=g), mask


def noise(batch: int, size: int = LATENT, seed: int = 0, dtype=torch.float32):
    return torch.randn(batch, CHANNELS, size, size, generator=torch.Generator().manual_seed(seed)).to(dtype)


def reference_sample(model, compute, noise_, cond, mask, steps=STEPS, guidance=1.5, cache_dtype=None):
    """The same loop on the unpatched model with METHOD.md §1 applied by ReferenceCache."""
    oracle = ReferenceCache(model, compute, cache_dtype=cache_dtype)
    try:
        return sample(model, ddim(), noise_, cond, steps, guidance, text_mask=mask)
    finally:
        oracle.remove()


def random_schedule(num_steps: int, num_units: int, seed: int = 0) -> CacheSchedule:
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(num_steps, num_units, generator=g) > 0.5
    mask[0] = True
    return CacheSchedule.from_mask(mask)


def count_unit_calls(model) -> tuple[Counter, list]:
    calls: Counter = Counter()
    hooks = []
    for i, block in enumerate(model.transformer_blocks):
        for branch in ("attn1", "attn2", "ff"):
            module = getattr(block, branch, None)
            if module is not None:
                name = f"blocks.{i}.{branch}"
                hooks.append(module.register_forward_pre_hook(lambda m, a, name=name: calls.update([name])))
    return calls, hooks


@pytest.fixture(autouse=True)
def op_backend():
    # The pure-torch ops by default (their exactness is the kernels' tests' business);
    # HARMONICA_BACKEND=cpp (or triton, cuda) runs the engine on that backend instead.
    with hk.use_backend(os.environ.get("HARMONICA_BACKEND", "torch")):
        yield


# ---------------------------------------------------------------------------------------------
# Units and blocks


def test_units_name_attn1_attn2_ff_per_block():
    assert units(tiny_dit(num_layers=2)) == ["blocks.0.attn1", "blocks.0.ff", "blocks.1.attn1", "blocks.1.ff"]
    assert units(tiny_pixart(num_layers=1)) == ["blocks.0.attn1", "blocks.0.attn2", "blocks.0.ff"]


@pytest.mark.parametrize("kind", ["dit", "pixart"])
def test_full_schedule_forward_matches_original_model(kind):
    model = make_model(kind)
    cond, mask = make_cond(kind, 2)
    x, t = noise(2), torch.tensor([999, 10])
    kwargs = (
        dict(class_labels=cond)
        if kind == "dit"
        else dict(
            encoder_hidden_states=cond,
            encoder_attention_mask=mask,
            added_cond_kwargs={"resolution": None, "aspect_ratio": None},
        )
    )
    with torch.no_grad():
        expected = model(x, timestep=t, **kwargs).sample
        enable_cache(model, CacheSchedule.full(1, len(units(model))))
        assert all(isinstance(b, CachedTransformerBlock) for b in model.transformer_blocks)
        got = model(x, timestep=t, **kwargs).sample
    torch.testing.assert_close(got, expected, **FP32)


@pytest.mark.parametrize("runs", [(True, True), (True, False), (False, True), (False, False)])
@pytest.mark.parametrize("bias", [True, False])
def test_ada_zero_projects_only_the_chunks_a_step_uses(runs, bias):
    linear = torch.nn.Linear(7, 6 * 5, bias=bias)
    emb = torch.randn(3, 7)
    expected = linear(emb).chunk(6, dim=1)
    got = _ada_zero_chunks(linear, emb, runs)
    attn_runs, ff_runs = runs
    needed = (attn_runs, attn_runs, True, ff_runs, ff_runs, True)
    for chunk, want, live in zip(got, expected, needed, strict=True):
        if live:
            torch.testing.assert_close(chunk, want, **FP32)
        else:
            assert chunk is None


@pytest.mark.parametrize("change", ["in place", "new parameter", "new data", "hooked"])
def test_reuse_step_gates_follow_the_projection_weights(change):
    """A step that reuses every unit keeps views of each block's gate rows between steps; changing
    the projection's weights in any way between two generations must show in the next reuse step,
    as it does in a fresh enable_cache on the changed model."""
    model = make_model("dit")
    schedule = CacheSchedule.fora(2, len(units(model)), 2)  # step 1 reuses every unit
    labels, _ = make_cond("dit", 2)
    x = noise(2)

    def generation(m):
        with torch.no_grad():
            m(x, timestep=torch.tensor([999, 999]), class_labels=labels)
            return m(x, timestep=torch.tensor([500, 500]), class_labels=labels).sample

    enable_cache(model, schedule)
    before = generation(model)  # builds the views
    linear = model.transformer_blocks[1].norm1.linear
    width = linear.out_features // 6
    with torch.no_grad():
        if change == "in place":
            linear.weight[2 * width : 3 * width].mul_(-2.0)
        elif change == "new parameter":
            linear.weight = torch.nn.Parameter(linear.weight * -2.0)
        elif change == "new data":
            linear.weight.data = linear.weight.data * -2.0
        else:  # a hook that changes the gates must run
            linear.register_forward_hook(lambda m, args, out: out * -2.0)
    got = generation(model)
    fresh = copy.deepcopy(model)
    disable_cache(fresh)
    enable_cache(fresh, schedule)
    torch.testing.assert_close(got, generation(fresh), rtol=0, atol=0)
    assert not torch.allclose(got, before)


def test_kept_gate_views_last_one_generation():
    """Built at a generation's first reuse step, dropped after its last step (or a reset), so a
    later model.to() never leaves the old weights alive behind them."""
    model = make_model("dit")
    handle = enable_cache(model, CacheSchedule.fora(3, len(units(model)), 3))  # steps 1, 2 reuse all
    labels, _ = make_cond("dit", 2)
    blocks = model.transformer_blocks

    def step(t):
        with torch.no_grad():
            model(noise(2), timestep=torch.tensor([t, t]), class_labels=labels)

    step(999)
    assert all(b._gate_views is None for b in blocks)  # step 0 computes every unit
    step(600)
    assert all(b._gate_views is not None for b in blocks)
    step(300)  # the last step
    assert all(b._gate_views is None for b in blocks)
    step(999)
    step(600)
    handle.reset()
    assert all(b._gate_views is None for b in blocks)


def test_a_model_with_kept_gate_views_deep_copies():
    """The kept views hold no autograd link to trainable parameters (deepcopy would refuse them),
    and a copy's views follow the copy's weights."""
    model = make_model("dit").requires_grad_(True)
    enable_cache(model, CacheSchedule.fora(2, len(units(model)), 2))
    labels, _ = make_cond("dit", 2)

    def generation(m):
        with torch.no_grad():
            m(noise(2), timestep=torch.tensor([999, 999]), class_labels=labels)
            return m(noise(2), timestep=torch.tensor([500, 500]), class_labels=labels).sample

    expected = generation(model)  # keeps the gate views
    twin = copy.deepcopy(model)
    torch.testing.assert_close(generation(twin), expected, rtol=0, atol=0)
    with torch.no_grad():
        twin.transformer_blocks[0].norm1.linear.weight.mul_(-1.0)
    assert not torch.allclose(generation(twin), expected)
    torch.testing.assert_close(generation(model), expected, rtol=0, atol=0)


@pytest.mark.parametrize("kind", ["dit", "pixart"])
def test_cached_blocks_share_the_original_parameters(kind):
    model = make_model(kind)
    keys = list(model.state_dict())
    params = {name: p.data_ptr() for name, p in model.named_parameters()}
    originals = list(model.transformer_blocks)
    enable_cache(model, CacheSchedule.fora(4, len(units(model)), 2))
    assert list(model.state_dict()) == keys
    assert {name: p.data_ptr() for name, p in model.named_parameters()} == params
    assert model.transformer_blocks[0].attn1 is originals[0].attn1
    disable_cache(model)
    assert all(a is b for a, b in zip(model.transformer_blocks, originals, strict=True))


# ---------------------------------------------------------------------------------------------
# Exactness against the independent METHOD.md §1 oracle, bare sampling loop


@pytest.mark.parametrize("kind", ["dit", "pixart"])
@pytest.mark.parametrize("schedule_name", ["full", "fora2", "fora3", "random"])
def test_bare_loop_matches_reference(kind, schedule_name):
    model = make_model(kind)
    num_units = len(units(model))
    schedule = {
        "full": CacheSchedule.full(STEPS, num_units),
        "fora2": CacheSchedule.fora(STEPS, num_units, 2),
        "fora3": CacheSchedule.fora(STEPS, num_units, 3),
        "random": random_schedule(STEPS, num_units),
    }[schedule_name]
    cond, mask = make_cond(kind, 2)
    with torch.no_grad():
        uncached = sample(model, ddim(), noise(2), cond, STEPS, text_mask=mask)
        expected = reference_sample(model, schedule.compute, noise(2), cond, mask)
        handle = enable_cache(model, schedule)
        handle.reset()
        got = sample(model, ddim(), noise(2), cond, STEPS, text_mask=mask)
    torch.testing.assert_close(got, expected, **FP32)
    if schedule_name == "full":
        torch.testing.assert_close(got, uncached, **FP32)
    else:
        assert not torch.allclose(got, uncached, atol=1e-4), "reuse must change the samples of a random model"
    assert handle.step == STEPS


def count_embedder_calls(model) -> tuple[Counter, list]:
    """Calls of each DiT block's timestep MLP and sinusoidal projection."""
    calls: Counter = Counter()
    hooks = []
    for i, block in enumerate(model.transformer_blocks):
        for part in ("timestep_embedder", "time_proj"):
            name = f"blocks.{i}.{part}"
            module = getattr(block.norm1.emb, part)
            hooks.append(module.register_forward_pre_hook(lambda m, a, name=name: calls.update([name])))
    return calls, hooks


@pytest.mark.parametrize("tied", [True, False])
def test_dit_conditioning_embedding_is_computed_once_per_step_and_group(tied):
    model = tiny_dit(num_layers=3)
    if tied:
        tie_dit_embedders(model)
    schedule = random_schedule(STEPS, len(units(model)))
    cond, _ = make_cond("dit", 2)
    with torch.no_grad():
        expected = reference_sample(model, schedule.compute, noise(2), cond, None)
        handle = enable_cache(model, schedule)
        calls, hooks = count_embedder_calls(model)
        got = sample(model, ddim(), noise(2), cond, STEPS)
    for hook in hooks:
        hook.remove()
    torch.testing.assert_close(got, expected, **FP32)
    # The projection is parameter-free: block 0's serves all. The MLP runs once per group of equal
    # embedders; DiT's output layer, which calls block 0's embedder itself, gets block 0's value.
    assert calls == Counter(
        {"blocks.0.time_proj": STEPS, "blocks.0.timestep_embedder": STEPS}
        | ({} if tied else {"blocks.1.timestep_embedder": STEPS, "blocks.2.timestep_embedder": STEPS})
    )
    assert not handle._embeddings._memo, "no step's embedding may outlive its call"
    disable_cache(model)
    assert "forward" not in model.transformer_blocks[0].norm1.emb.__dict__


def test_dit_embedder_changed_after_enable_is_no_longer_shared():
    model = tie_dit_embedders(tiny_dit(num_layers=3))
    schedule = CacheSchedule.full(STEPS, len(units(model)))
    cond, _ = make_cond("dit", 2)
    handle = enable_cache(model, schedule)
    calls, hooks = count_embedder_calls(model)
    with torch.no_grad():
        sample(model, ddim(), noise(2), cond, STEPS)
        assert calls["blocks.1.timestep_embedder"] == 0
        model.transformer_blocks[1].norm1.emb.timestep_embedder.linear_2.weight.mul_(1.5)  # in place
        table = model.transformer_blocks[2].norm1.emb.class_embedder.embedding_table
        table.weight = torch.nn.Parameter(table.weight + 0.5)  # replaced
        handle.reset()
        calls.clear()
        got = sample(model, ddim(), noise(2), cond, STEPS)
        assert calls["blocks.1.timestep_embedder"] == calls["blocks.2.timestep_embedder"] == STEPS
        for hook in hooks:
            hook.remove()
        disable_cache(model)
        expected = sample(model, ddim(), noise(2), cond, STEPS)
    torch.testing.assert_close(got, expected, **FP32)


def test_dit_embedders_run_per_block_in_training_mode():
    # Label dropout draws per block in training mode: sharing would change what diffusers computes.
    # Under eval they are shared again. (Autograd through a cached model is refused outright:
    # tests/reliability/test_autograd.py.)
    model = tie_dit_embedders(tiny_dit(num_layers=3))
    model.train()
    enable_cache(model, CacheSchedule.full(3, len(units(model))))
    calls, hooks = count_embedder_calls(model)
    args = dict(timestep=torch.tensor([999, 10]), class_labels=torch.tensor([1, 2]))
    with torch.no_grad():
        model(noise(2), **args)
        model(noise(2), **args)
        model.eval()
        model(noise(2), **args)  # eval: shared again
    for hook in hooks:
        hook.remove()
    # per block, and again for DiT's output layer, twice; then block 0 once for all
    assert [calls[f"blocks.{i}.timestep_embedder"] for i in range(3)] == [5, 2, 2]


def test_output_layer_embedding_follows_block_0_when_block_0_does_not_share():
    model = tie_dit_embedders(tiny_dit(num_layers=3))
    model.transformer_blocks[0].norm1.emb.train()  # block 0 alone draws its own label dropout
    enable_cache(model, CacheSchedule.full(1, len(units(model))))
    calls, hooks = count_embedder_calls(model)
    with torch.no_grad():
        model(noise(2), timestep=torch.tensor([999, 10]), class_labels=torch.tensor([1, 2]))
    for hook in hooks:
        hook.remove()
    # block 1 computes the group's value and block 2 takes it; the output layer calls block 0's own
    assert [calls[f"blocks.{i}.timestep_embedder"] for i in range(3)] == [2, 1, 0]


def test_bare_loop_reset_starts_a_new_generation():
    model = tiny_dit()
    schedule = CacheSchedule.fora(STEPS, len(units(model)), 2)
    cond, _ = make_cond("dit", 2)
    handle = enable_cache(model, schedule)
    with torch.no_grad():
        first = sample(model, ddim(), noise(2), cond, STEPS)
        # the timestep going back up starts a new generation by itself (tests/reliability)
        torch.testing.assert_close(sample(model, ddim(), noise(2), cond, STEPS), first, rtol=0, atol=0)
        handle.reset()
        assert handle.step == 0 and handle.cache_bytes == 0
        second = sample(model, ddim(), noise(2), cond, STEPS)
    torch.testing.assert_close(second, first, rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------
# Pipelines


def dit_call(pipe, labels, steps=STEPS, guidance=4.0, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return pipe(
        labels, guidance_scale=guidance, generator=generator, num_inference_steps=steps, output_type="pt"
    ).images


def pixart_call(pipe, batch, steps=STEPS, guidance=4.5, seed=0, size=2 * LATENT):
    generator = torch.Generator().manual_seed(seed)
    return pipe(
        num_inference_steps=steps,
        guidance_scale=guidance,
        generator=generator,
        output_type="latent",
        height=size,
        width=size,
        **prompt_kwargs(batch),
    ).images


@pytest.fixture
def dit_pipe():
    pipe = dit_pipeline()
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture
def pixart_pipe():
    if not _has_transformers():
        pytest.skip("PixArtAlphaPipeline needs the `transformers` package")
    pipe = pixart_pipeline()
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_dit_pipeline_full_and_fora_match_reference(dit_pipe):
    model = dit_pipe.transformer
    num_units = len(units(model))
    labels = [3, 7]
    uncached = dit_call(dit_pipe, labels)
    fora = CacheSchedule.fora(STEPS, num_units, 2)
    oracle = ReferenceCache(model, fora.compute)
    expected = dit_call(dit_pipe, labels)
    oracle.remove()

    enable_cache(dit_pipe, CacheSchedule.full(STEPS, num_units))
    torch.testing.assert_close(dit_call(dit_pipe, labels), uncached, **FP32)
    disable_cache(dit_pipe)

    handle = enable_cache(dit_pipe, fora)
    got = dit_call(dit_pipe, labels)
    torch.testing.assert_close(got, expected, **FP32)
    # A second pipeline call resets the step counter itself and repeats the result exactly.
    torch.testing.assert_close(dit_call(dit_pipe, labels), got, rtol=0, atol=0)
    assert handle.step == STEPS


def test_pixart_pipeline_full_and_fora_match_reference(pixart_pipe):
    model = pixart_pipe.transformer
    num_units = len(units(model))
    uncached = pixart_call(pixart_pipe, 2)
    fora = CacheSchedule.fora(STEPS, num_units, 3)
    oracle = ReferenceCache(model, fora.compute)
    expected = pixart_call(pixart_pipe, 2)
    oracle.remove()

    enable_cache(pixart_pipe, CacheSchedule.full(STEPS, num_units))
    torch.testing.assert_close(pixart_call(pixart_pipe, 2), uncached, **FP32)
    disable_cache(pixart_pipe)

    enable_cache(pixart_pipe, fora)
    got = pixart_call(pixart_pipe, 2)
    torch.testing.assert_close(got, expected, **FP32)
    torch.testing.assert_close(pixart_call(pixart_pipe, 2), got, rtol=0, atol=0)


@pytest.mark.parametrize("kind", ["dit", "pixart"])
def test_reused_units_are_not_called(kind, request):
    pipe = request.getfixturevalue(f"{kind}_pipe")
    model = pipe.transformer
    schedule = random_schedule(STEPS, len(units(model)), seed=3)
    enable_cache(pipe, schedule)
    calls, hooks = count_unit_calls(model)
    if kind == "dit":
        dit_call(pipe, [1])
    else:
        pixart_call(pipe, 1)
    for hook in hooks:
        hook.remove()
    expected = dict(zip(units(model), schedule.compute.sum(dim=0).tolist(), strict=True))
    assert dict(calls) == expected


def test_pipeline_batch_size_and_cfg_changes_between_calls(dit_pipe):
    model = dit_pipe.transformer
    fora = CacheSchedule.fora(STEPS, len(units(model)), 2)
    expected = {}
    oracle = ReferenceCache(model, fora.compute)
    for labels, guidance in (([1, 2], 4.0), ([5], 1.0), ([1, 2, 3], 4.0)):
        oracle.reset()
        expected[len(labels), guidance] = dit_call(dit_pipe, labels, guidance=guidance)
    oracle.remove()

    handle = enable_cache(dit_pipe, fora)
    width = model.inner_dim
    tokens = (LATENT // 2) ** 2
    for labels, guidance in (([1, 2], 4.0), ([5], 1.0), ([1, 2, 3], 4.0)):
        got = dit_call(dit_pipe, labels, guidance=guidance)
        torch.testing.assert_close(got, expected[len(labels), guidance], **FP32)
        batch = len(labels) * (2 if guidance > 1 else 1)  # CFG doubles the transformer batch
        assert handle.cache_bytes == len(units(model)) * batch * tokens * width * 4


def test_pixart_pipeline_resolution_and_cfg_changes_rebuild_the_cache(pixart_pipe):
    model = pixart_pipe.transformer
    fora = CacheSchedule.fora(STEPS, len(units(model)), 2)
    oracle = ReferenceCache(model, fora.compute)
    expected_small = pixart_call(pixart_pipe, 1, size=16)
    oracle.reset()
    expected_large = pixart_call(pixart_pipe, 1, size=24, guidance=1.0)
    oracle.remove()

    handle = enable_cache(pixart_pipe, fora)
    torch.testing.assert_close(pixart_call(pixart_pipe, 1, size=16), expected_small, **FP32)
    small_bytes = handle.cache_bytes  # 2 rows (CFG) x 4x4 tokens
    torch.testing.assert_close(pixart_call(pixart_pipe, 1, size=24, guidance=1.0), expected_large, **FP32)
    assert handle.cache_bytes == small_bytes * (1 * 6 * 6) // (2 * 4 * 4)


def test_pipeline_with_other_num_inference_steps_is_an_error(dit_pipe):
    handle = enable_cache(dit_pipe, CacheSchedule.fora(STEPS, len(units(dit_pipe.transformer)), 2))
    with pytest.raises(
        ScheduleMismatchError, match=f"made for {STEPS} denoising steps but the scheduler was set up for 9"
    ):
        dit_call(dit_pipe, [1], steps=9)
    assert handle.step == 0
    dit_call(dit_pipe, [1])  # the right count still works afterwards
    assert handle.step == STEPS


def test_shape_change_within_a_generation_is_an_error():
    model = tiny_dit()
    handle = enable_cache(model, CacheSchedule.fora(STEPS, len(units(model)), 2))
    t = torch.tensor([500])
    with torch.no_grad():
        model(noise(2), timestep=t.expand(2), class_labels=torch.tensor([1, 2]))
        with pytest.raises(CacheStateError, match=r"allocated at step 0 for \(2, 16, 32"):
            model(noise(3), timestep=t.expand(3), class_labels=torch.tensor([1, 2, 3]))
        with pytest.raises(CacheStateError, match="call handle.reset"):
            model(noise(2, size=2 * LATENT), timestep=t.expand(2), class_labels=torch.tensor([1, 2]))
        with pytest.raises(CacheStateError, match="bfloat16"):
            model.to(torch.bfloat16)(
                noise(2, dtype=torch.bfloat16), timestep=t.expand(2), class_labels=torch.tensor([1, 2])
            )
        model.float()
        assert handle.step == 1
        handle.reset()
        model(noise(2, size=2 * LATENT), timestep=t.expand(2), class_labels=torch.tensor([1, 2]))
    assert handle.cache_bytes == len(units(model)) * 2 * 64 * 32 * 4


def test_bare_resolution_change_after_reset_matches_reference():
    model = tiny_dit()
    schedule = CacheSchedule.fora(STEPS, len(units(model)), 3)
    cond, _ = make_cond("dit", 1)
    with torch.no_grad():
        expected = reference_sample(model, schedule.compute, noise(1, size=2 * LATENT), cond, None)
        handle = enable_cache(model, schedule)
        handle.reset()
        sample(model, ddim(), noise(1), cond, STEPS)
        handle.reset()
        got = sample(model, ddim(), noise(1, size=2 * LATENT), cond, STEPS)
    torch.testing.assert_close(got, expected, **FP32)


# ---------------------------------------------------------------------------------------------
# Precision


@pytest.mark.parametrize("kind", ["dit", "pixart"])
def test_bf16_model_matches_reference(kind):
    model = make_model(kind).to(torch.bfloat16)
    schedule = CacheSchedule.fora(STEPS, len(units(model)), 2)
    cond, mask = make_cond(kind, 2)
    if kind == "pixart":
        cond = cond.to(torch.bfloat16)
    x = noise(2, dtype=torch.bfloat16)
    with torch.no_grad():
        expected = reference_sample(model, schedule.compute, x, cond, mask)
        handle = enable_cache(model, schedule)
        handle.reset()
        got = sample(model, ddim(), x, cond, STEPS, text_mask=mask)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), expected.float(), **BF16)
    assert handle.cache_bytes == len(units(model)) * 4 * 16 * 32 * 2


@pytest.mark.parametrize("kind", ["dit", "pixart"])
def test_bf16_cache_under_fp32_model(kind):
    model = make_model(kind)
    schedule = CacheSchedule.fora(STEPS, len(units(model)), 2)
    cond, mask = make_cond(kind, 2)
    with torch.no_grad():
        expected = reference_sample(model, schedule.compute, noise(2), cond, mask, cache_dtype=torch.bfloat16)
        handle = enable_cache(model, schedule, cache_dtype=torch.bfloat16)
        handle.reset()
        got = sample(model, ddim(), noise(2), cond, STEPS, text_mask=mask)
    assert got.dtype == torch.float32
    # A last-ulp fp32 difference (fused vs unfused residual) can flip one bf16 rounding of the cache.
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    assert handle.cache_bytes == len(units(model)) * 4 * 16 * 32 * 2  # half the fp32 cache


# ---------------------------------------------------------------------------------------------
# Memory


def test_buffers_only_for_reused_units_and_freed_on_reset_and_disable():
    model = tiny_dit()
    mask = torch.ones(STEPS, 4, dtype=torch.bool)
    mask[1:, 1] = False  # only blocks.0.ff is ever reused
    handle = enable_cache(model, CacheSchedule.from_mask(mask))
    assert handle.cache_bytes == 0
    cond, _ = make_cond("dit", 2)
    with torch.no_grad():
        sample(model, ddim(), noise(2), cond, STEPS)
    assert handle.cache_bytes == 4 * 16 * 32 * 4
    handle.reset()
    assert handle.cache_bytes == 0
    with torch.no_grad():
        sample(model, ddim(), noise(2), cond, 1, guidance=1.0)
    disable_cache(model)
    assert handle.cache_bytes == 0

    full = enable_cache(model, CacheSchedule.full(STEPS, 4))
    with torch.no_grad():
        sample(model, ddim(), noise(2), cond, 1)
    assert full.cache_bytes == 0


# ---------------------------------------------------------------------------------------------
# Enabling and disabling


def test_disable_restores_the_model_and_scheduler_exactly(dit_pipe):
    model = dit_pipe.transformer
    original_class = type(model)
    blocks = list(model.transformer_blocks)
    before = dit_call(dit_pipe, [4])
    handle = enable_cache(dit_pipe, CacheSchedule.fora(STEPS, len(units(model)), 2))
    assert model._harmonica_cache is handle
    assert "set_timesteps" in dit_pipe.scheduler.__dict__
    dit_call(dit_pipe, [4])
    disable_cache(dit_pipe)
    assert type(model) is original_class
    assert getattr(model, "_harmonica_cache", None) is None
    assert "set_timesteps" not in dit_pipe.scheduler.__dict__
    assert all(a is b for a, b in zip(model.transformer_blocks, blocks, strict=True))
    torch.testing.assert_close(dit_call(dit_pipe, [4]), before, rtol=0, atol=0)
    disable_cache(dit_pipe)  # a no-op once disabled


def test_disable_after_dtype_change_keeps_original_blocks_in_sync():
    model = tiny_pixart()
    enable_cache(model, CacheSchedule.full(2, len(units(model))))
    model.to(torch.bfloat16)
    disable_cache(model)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    assert model.transformer_blocks[0].scale_shift_table.dtype == torch.bfloat16


def test_enable_errors_leave_the_model_untouched():
    model = tiny_dit()
    blocks = list(model.transformer_blocks)
    with pytest.raises(ScheduleMismatchError, match="has 4"):
        enable_cache(model, CacheSchedule.full(STEPS, 6))
    with pytest.raises(TypeError, match="CacheSchedule or a Router"):
        enable_cache(model, torch.ones(STEPS, 4, dtype=torch.bool))
    with pytest.raises(TypeError, match="cache_dtype"):
        enable_cache(model, CacheSchedule.full(STEPS, 4), cache_dtype=torch.int8)
    model.transformer_blocks[1].only_cross_attention = True
    with pytest.raises(UnsupportedModelError, match="only_cross_attention"):
        enable_cache(model, CacheSchedule.full(STEPS, 4))
    model.transformer_blocks[1].only_cross_attention = False
    assert all(a is b for a, b in zip(model.transformer_blocks, blocks, strict=True))
    assert type(model) is DiTTransformer2DModel
    enable_cache(model, CacheSchedule.full(STEPS, 4))
    with pytest.raises(CacheStateError, match="already enabled"):
        enable_cache(model, CacheSchedule.full(STEPS, 4))


def test_unsupported_models_are_refused_by_name():
    with pytest.raises(UnsupportedModelError, match="DiTTransformer2DModel, PixArtTransformer2DModel"):
        enable_cache(torch.nn.Linear(2, 2), CacheSchedule.full(1, 1))


def test_cached_block_outside_a_transformer_call_is_an_error():
    model = tiny_dit()
    enable_cache(model, CacheSchedule.full(1, 4))
    x = torch.randn(1, 16, 32)
    with pytest.raises(CacheStateError, match="outside a call of its transformer"):
        model.transformer_blocks[0](x, timestep=torch.tensor([1]), class_labels=torch.tensor([1]))


def test_affine_norms_take_the_exact_diffusers_path():
    model = tiny_pixart(norm_elementwise_affine=True)
    for block in model.transformer_blocks:
        torch.nn.init.normal_(block.norm2.weight)
        torch.nn.init.normal_(block.norm2.bias)
    schedule = random_schedule(STEPS, len(units(model)), seed=5)
    cond, mask = make_cond("pixart", 1)
    with torch.no_grad():
        expected = reference_sample(model, schedule.compute, noise(1), cond, mask)
        enable_cache(model, schedule).reset()
        got = sample(model, ddim(), noise(1), cond, STEPS, text_mask=mask)
    torch.testing.assert_close(got, expected, **FP32)


def test_chunked_feed_forward_is_honoured():
    model = tiny_dit()
    schedule = random_schedule(STEPS, len(units(model)), seed=6)
    cond, _ = make_cond("dit", 1)
    handle = enable_cache(model, schedule)
    with torch.no_grad():
        handle.reset()
        expected = sample(model, ddim(), noise(1), cond, STEPS)
        calls, _ = count_unit_calls(model)
        for block in model.transformer_blocks:
            block.set_chunk_feed_forward(8, dim=1)  # 16 tokens -> the MLP runs on 2 chunks
        handle.reset()
        got = sample(model, ddim(), noise(1), cond, STEPS)
    assert calls["blocks.0.ff"] == 2 * int(schedule.compute[:, 1].sum())
    torch.testing.assert_close(got, expected, **FP32)


# ---------------------------------------------------------------------------------------------
# Routers


def test_router_enables_its_thresholded_schedule_and_refuses_other_models():
    model = tiny_dit()
    router = Router.for_model(model, STEPS, scheduler=ddim(), seed=1)
    handle = enable_cache(model, router, threshold=0.4)
    assert handle.schedule == router.to_schedule(0.4)
    disable_cache(model)
    other = tiny_dit(num_layers=3)
    with pytest.raises(RouterMismatchError, match=r"depth=2, width=32.*depth=3, width=32"):
        enable_cache(other, router)


def test_router_made_for_another_sampler_warns(dit_pipe):
    router = Router.for_model(dit_pipe.transformer, STEPS, scheduler=EulerDiscreteScheduler())
    expected = "trained with EulerDiscreteScheduler but the pipeline samples with DDIMScheduler"
    with pytest.warns(UserWarning, match=expected):
        enable_cache(dit_pipe, router)


# ---------------------------------------------------------------------------------------------
# torch.compile


@pytest.mark.parametrize("tied", [False, True], ids=["own-embedders", "tied-embedders"])
@pytest.mark.parametrize(
    "backend",
    [
        "aot_eager",
        pytest.param(
            "inductor",
            marks=pytest.mark.skipif(
                os.environ.get("HARMONICA_TEST_INDUCTOR") != "1",
                reason="compiling C++ for two graphs takes minutes on 2 cores; set HARMONICA_TEST_INDUCTOR=1",
            ),
        ),
    ],
)
def test_compiled_steps_fullgraph_match_eager(backend, tied):
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    model = tie_dit_embedders(tiny_dit()) if tied else tiny_dit()
    num_units = len(units(model))
    schedule = CacheSchedule.fora(STEPS, num_units, 2)
    cond, _ = make_cond("dit", 2)
    handle = enable_cache(model, schedule)
    with torch.no_grad():
        handle.reset()
        eager = sample(model, ddim(), noise(2), cond, STEPS)
        counter = CompileCounterWithBackend(backend)
        compiled = torch.compile(model, backend=counter, fullgraph=True)
        handle.reset()
        got = sample(compiled, ddim(), noise(2), cond, STEPS)
        handle.reset()
        again = sample(compiled, ddim(), noise(2), cond, STEPS)
    # One graph per distinct schedule row (compute-all, reuse-all), not one per step.
    assert counter.frame_count == 2
    assert handle.step == STEPS
    torch.testing.assert_close(got, eager, **FP32)
    torch.testing.assert_close(again, got, rtol=0, atol=0)
    torch._dynamo.reset()


def test_deepcopy_of_a_cached_pipeline_is_independent(dit_pipe):
    handle = enable_cache(dit_pipe, CacheSchedule.fora(STEPS, 4, 2))
    clone = copy.deepcopy(dit_pipe)
    clone_handle = clone.transformer._harmonica_cache
    assert clone_handle is not handle
    assert clone.transformer.transformer_blocks[0]._handle is clone_handle
    assert clone.transformer.transformer_blocks[0].norm1.emb.forward.__self__ is clone_handle._embeddings
    torch.testing.assert_close(dit_call(clone, [2]), dit_call(dit_pipe, [2]), rtol=0, atol=0)
    disable_cache(clone)
    assert type(clone.transformer) is DiTTransformer2DModel
    assert "set_timesteps" not in clone.scheduler.__dict__
    assert dit_pipe.transformer._harmonica_cache is handle
    assert isinstance(dit_pipe.transformer.transformer_blocks[0], CachedTransformerBlock)
