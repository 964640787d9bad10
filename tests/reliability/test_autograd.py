"""Autograd through a cached model is refused the moment it would build a graph (README says so)."""

from __future__ import annotations

import pytest
import torch

from harmonica import CacheSchedule, disable_cache, enable_cache, units
from harmonica.cache import CacheStateError

from ..harmonica.tiny_models import tiny_dit, tiny_pixart

ARGS = dict(timestep=torch.tensor([999, 999]), class_labels=torch.tensor([1, 2]))


@pytest.mark.parametrize("schedule", ["full", "fora"])
def test_grad_on_trainable_weights_is_refused_and_the_fixes_work(schedule):
    model = tiny_dit()
    n = len(units(model))
    enable_cache(model, CacheSchedule.full(3, n) if schedule == "full" else CacheSchedule.fora(3, n, 2))
    x = torch.ones(2, 4, 8, 8)
    with pytest.raises(CacheStateError, match="inference-only.*torch.no_grad"):
        model(x, **ARGS)
    with torch.no_grad():
        expected = model(x, **ARGS).sample
    model.requires_grad_(False)  # frozen: autograd on is fine, nothing would get a gradient
    torch.testing.assert_close(model(x, **ARGS).sample, expected)
    model.requires_grad_(True)
    disable_cache(model)  # the stock model backpropagates as ever
    model(x, **ARGS).sample.sum().backward()
    assert any(p.grad is not None for p in model.parameters())


def test_grad_on_the_input_is_refused_even_with_frozen_weights():
    model = tiny_pixart().requires_grad_(False)
    enable_cache(model, CacheSchedule.full(3, len(units(model))))
    x = torch.randn(2, 4, 8, 8, requires_grad=True)
    with pytest.raises(CacheStateError, match="inference-only"):
        model(
            x,
            encoder_hidden_states=torch.randn(2, 3, 24),
            timestep=torch.tensor([999, 999]),
            added_cond_kwargs={"resolution": None, "aspect_ratio": None},
        )
