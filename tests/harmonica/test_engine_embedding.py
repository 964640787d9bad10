"""DiT's conditioning embedding computed without module calls: the same values, and the module
path whenever a hook, a patched forward or training mode could make the calls matter."""

from __future__ import annotations

import pytest
import torch
from diffusers import DiTTransformer2DModel

from harmonica import CacheSchedule, disable_cache, enable_cache, units
from harmonica import cache as cache_module


def _untied_dit(num_layers: int = 3) -> DiTTransformer2DModel:
    torch.manual_seed(0)
    model = DiTTransformer2DModel(
        num_attention_heads=2,
        attention_head_dim=8,
        in_channels=4,
        out_channels=8,
        num_layers=num_layers,
        sample_size=8,
        patch_size=2,
    )
    return model.eval().requires_grad_(False)


@pytest.fixture
def plain_uses(monkeypatch) -> list[bool]:
    """Records each decision of _runs_plainly (True: the module calls were skipped)."""
    decisions: list[bool] = []
    original = cache_module._runs_plainly

    def spy(modules):
        decisions.append(original(modules))
        return decisions[-1]

    monkeypatch.setattr(cache_module, "_runs_plainly", spy)
    return decisions


def _step(model, t: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(2, 4, 8, 8, generator=generator)
    with torch.no_grad():
        return model(latents, timestep=torch.tensor([t, t]), class_labels=torch.tensor([3, 1000])).sample


def test_plain_embedding_equals_the_module_calls(plain_uses):
    model = _untied_dit()
    schedule = CacheSchedule.full(2, len(units(model)))
    handle = enable_cache(model, schedule)
    plain = _step(model, 999)
    assert plain_uses and all(plain_uses), "every block's embedding should skip the module calls"
    # A no-op hook on one submodule per block puts every block back on the module calls.
    hooks = [
        block.norm1.emb.timestep_embedder.linear_1.register_forward_pre_hook(lambda m, a: None)
        for block in model.transformer_blocks
    ]
    plain_uses.clear()
    handle.reset()  # the same step 0 again
    modules = _step(model, 999)
    for hook in hooks:
        hook.remove()
    assert plain_uses and not any(plain_uses)
    torch.testing.assert_close(plain, modules, rtol=0, atol=0)
    disable_cache(model)
    torch.testing.assert_close(_step(model, 999), plain)  # diffusers' own (unfused residuals)


@pytest.mark.parametrize("case", ["patched forward", "global hook", "training label dropout"])
def test_module_calls_run_when_they_could_matter(plain_uses, case):
    model = _untied_dit(num_layers=2)
    enable_cache(model, CacheSchedule.full(2, len(units(model))))
    block = model.transformer_blocks[1]
    class_embedder = block.norm1.emb.class_embedder
    calls = []
    handle = None
    if case == "patched forward":  # e.g. accelerate's offloading hooks replace forward
        original = class_embedder.embedding_table.forward

        def patched(labels):
            calls.append("patched")
            return original(labels)

        class_embedder.embedding_table.forward = patched
    elif case == "global hook":
        handle = torch.nn.modules.module.register_module_forward_pre_hook(lambda m, a: calls.append("hook"))
    else:
        class_embedder.train()
    try:
        _step(model, 999)
    finally:
        if handle is not None:
            handle.remove()
    assert False in plain_uses
    if case != "training label dropout":
        assert calls, "the module calls must run so that the hook or patch sees them"


def _generation(model, steps: int) -> list[torch.Tensor]:
    return [_step(model, t) for t in range(999, 999 - 50 * steps, -50)]


def test_stacked_embeddings_of_a_reuse_step_equal_the_per_block_ones(monkeypatch):
    """On steps that compute no unit every block's embedding comes from one stacked computation:
    the same values as each block's own MLP (to rounding), dropped with the generation."""
    from harmonica.adapters import basic

    model = _untied_dit()
    handle = enable_cache(model, CacheSchedule.fora(4, len(units(model)), 2))  # steps 1 and 3 reuse all
    built = []
    original_build = basic._StackedEmbedders.build
    monkeypatch.setattr(
        basic._StackedEmbedders, "build", lambda leaders: built.append(1) or original_build(leaders)
    )
    stacked = _generation(model, 4)
    assert built == [1], "one stack per generation, built at its first step that reuses every unit"
    assert handle._embeddings._stack is None, "the stack must not outlive its generation"
    monkeypatch.setattr(basic._StackedEmbedders, "build", lambda leaders: None)
    handle.reset()
    per_block = _generation(model, 4)
    for i, (a, b) in enumerate(zip(stacked, per_block, strict=True)):
        if i % 2 == 0:  # steps that compute: the per-block maths, bit for bit
            torch.testing.assert_close(a, b, rtol=0, atol=0)
        else:
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
            assert not torch.equal(a, _step(model, 999)), "a reuse step must differ from a computed one"


def test_stacked_embeddings_step_aside_for_a_hook_or_changed_weights():
    model = _untied_dit()
    enable_cache(model, CacheSchedule.fora(2, len(units(model)), 2))
    calls = []
    hook = model.transformer_blocks[2].norm1.emb.timestep_embedder.linear_2.register_forward_hook(
        lambda m, a, out: calls.append(1)
    )
    _generation(model, 2)
    hook.remove()
    assert calls == [1, 1], "a hooked embedder must be called at every step, reused or not"
    reference = _generation(model, 2)
    # New weights for one embedder between generations: the next stack holds them.
    with torch.no_grad():
        model.transformer_blocks[1].norm1.emb.timestep_embedder.linear_1.weight.mul_(1.5)
    changed = _generation(model, 2)
    assert not torch.equal(changed[1], reference[1])
    disable_cache(model)
    enable_cache(model, CacheSchedule.fora(2, len(units(model)), 2))
    torch.testing.assert_close(_generation(model, 2)[1], changed[1], rtol=0, atol=0)
