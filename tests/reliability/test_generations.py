"""Generation boundaries: a user's loop needs no reset(), a restart never reads the previous
generation's cache, a loop longer than the schedule names both counts and the fix."""

from __future__ import annotations

import pytest
import torch

from harmonica import CacheSchedule, enable_cache, units
from harmonica.cache import CacheStateError

from ..harmonica.tiny_models import ddim, dit_pipeline, sample, tiny_dit

T = 4


def _labels():
    return torch.tensor([1, 2])


def _noise(seed=0):
    return torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(seed))


def _fresh(steps):
    model = tiny_dit()
    enable_cache(model, CacheSchedule.fora(T, len(units(model)), 2))
    with torch.no_grad():
        return sample(model, ddim(), _noise(), _labels(), steps)


def test_a_loop_shorter_than_the_schedule_twice_does_not_read_the_stale_cache():
    expected = _fresh(T - 1)
    model = tiny_dit()
    enable_cache(model, CacheSchedule.fora(T, len(units(model)), 2))
    with torch.no_grad():
        first = sample(model, ddim(), _noise(), _labels(), T - 1)
        second = sample(model, ddim(), _noise(), _labels(), T - 1)  # no reset()
    torch.testing.assert_close(first, expected, rtol=0, atol=0)
    torch.testing.assert_close(second, expected, rtol=0, atol=0)


def test_a_full_loop_twice_without_reset_just_works():
    expected = _fresh(T)
    model = tiny_dit()
    handle = enable_cache(model, CacheSchedule.fora(T, len(units(model)), 2))
    with torch.no_grad():
        for _ in range(3):
            got = sample(model, ddim(), _noise(), _labels(), T)
            torch.testing.assert_close(got, expected, rtol=0, atol=0)
    assert handle.step == T


def test_a_mid_schedule_restart_computes_everything_afresh():
    def cached():
        model = tiny_dit()
        handle = enable_cache(model, CacheSchedule.fora(T, len(units(model)), 3))  # steps 1, 2 reuse
        return model, handle

    scheduler = ddim()
    scheduler.set_timesteps(T)
    ts = scheduler.timesteps
    fresh, _ = cached()
    model, handle = cached()
    with torch.no_grad():
        expected = fresh(_noise(1), timestep=ts[0].expand(2), class_labels=_labels()).sample
        for t in ts[:2]:
            model(_noise(), timestep=t.expand(2), class_labels=_labels())
        # the timestep goes back up: a new generation, not step 2 on the old cache
        got = model(_noise(1), timestep=ts[0].expand(2), class_labels=_labels()).sample
    assert handle.step == 1
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_pipeline_calls_on_a_cached_transformer_with_fewer_steps_are_independent():
    pipe = dit_pipeline()
    enable_cache(pipe.transformer, CacheSchedule.fora(T, len(units(pipe.transformer)), 2))  # no hook

    def run():
        generator = torch.Generator().manual_seed(0)
        return pipe(class_labels=[1], num_inference_steps=T - 1, generator=generator, output_type="np").images

    first, second = run(), run()
    assert (first == second).all()


def test_a_loop_longer_than_the_schedule_names_the_counts_and_the_fix():
    model = tiny_dit()
    enable_cache(model, CacheSchedule.fora(T, len(units(model)), 2))
    with torch.no_grad(), pytest.raises(CacheStateError) as err:
        sample(model, ddim(), _noise(), _labels(), T + 2)
    message = str(err.value)
    assert f"made for {T} denoising steps" in message and f"at least {T + 1} steps" in message
    assert "schedule (or router) made for your number of steps" in message


def test_device_timesteps_from_one_array_are_compared_without_reading_them():
    from harmonica.cache import _starts_over

    # meta tensors have no values: a host read would raise, so the offsets alone decide
    timesteps = torch.arange(999, 0, -100, device="meta")
    assert not _starts_over(timesteps[2].expand(2), timesteps[3].expand(2))
    assert _starts_over(timesteps[3].expand(2), timesteps[0].expand(2))
    assert not _starts_over(timesteps[3], timesteps[3])  # the same step again (e.g. Heun): not new
