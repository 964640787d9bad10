"""One cached model in two threads: one generation at a time, anything else a clear error (never a
silently wrong image); sequential use from several threads works."""

from __future__ import annotations

import threading

import pytest
import torch

from harmonica import CacheSchedule, enable_cache, units
from harmonica.cache import CacheStateError

from ..harmonica.tiny_models import ddim, sample, tiny_dit

T = 4


def _call(model, t):
    with torch.no_grad():
        return model(torch.ones(2, 4, 8, 8), timestep=torch.tensor([t, t]), class_labels=torch.tensor([1, 2]))


def _in_thread(fn):
    box = {}

    def run():
        try:
            box["result"] = fn()
        except Exception as err:  # noqa: BLE001 - handed to the test
            box["error"] = err

    thread = threading.Thread(target=run)
    thread.start()
    thread.join(timeout=60)
    return box


def test_a_call_from_another_thread_mid_generation_is_an_error_and_the_first_finishes_right():
    def expected():
        model = tiny_dit()
        enable_cache(model, CacheSchedule.fora(T, len(units(model)), 2))
        with torch.no_grad():
            return sample(model, ddim(), torch.ones(1, 4, 8, 8), torch.tensor([3]), T)

    model = tiny_dit()
    handle = enable_cache(model, CacheSchedule.fora(T, len(units(model)), 2))
    scheduler = ddim()
    scheduler.set_timesteps(T)
    x = torch.ones(1, 4, 8, 8)
    with torch.no_grad():
        for i, t in enumerate(scheduler.timesteps):
            inp = torch.cat([x, x])
            out = model(inp, timestep=t.expand(2), class_labels=torch.tensor([3, 1000])).sample[:, :4]
            if i == 1:  # another thread tries to start its own generation in the middle of ours
                box = _in_thread(lambda: _call(model, 999))
                assert isinstance(box.get("error"), CacheStateError), box
                assert "another thread" in str(box["error"]) and "copy.deepcopy" in str(box["error"])
            cond, uncond = out.split(1)
            x = scheduler.step(uncond + 1.5 * (cond - uncond), t, x).prev_sample
    assert handle.step == T
    torch.testing.assert_close(x, expected(), rtol=0, atol=0)


def test_overlapping_calls_are_an_error():
    model = tiny_dit()
    enable_cache(model, CacheSchedule.fora(T, len(units(model)), 2))
    inside, release = threading.Event(), threading.Event()

    def hold(module, args):
        inside.set()
        release.wait(timeout=30)

    hook = model.transformer_blocks[0].register_forward_pre_hook(hold)
    first = threading.Thread(target=lambda: _call(model, 999))
    first.start()
    assert inside.wait(timeout=30)
    hook.remove()
    try:
        with pytest.raises(CacheStateError, match="already running a call in another thread"):
            _call(model, 999)
    finally:
        release.set()
        first.join(timeout=60)


def test_whole_generations_from_two_threads_in_turn_work():
    model = tiny_dit()
    enable_cache(model, CacheSchedule.fora(T, len(units(model)), 2))
    with torch.no_grad():
        expected = sample(model, ddim(), torch.ones(2, 4, 8, 8), torch.tensor([1, 2]), T)

    def generate():
        with torch.no_grad():  # grad mode is per thread
            return sample(model, ddim(), torch.ones(2, 4, 8, 8), torch.tensor([1, 2]), T)

    for _ in range(2):
        box = _in_thread(generate)
        assert "error" not in box, box
        torch.testing.assert_close(box["result"], expected, rtol=0, atol=0)


def test_a_pipeline_call_from_another_thread_mid_generation_leaves_the_first_intact():
    from ..harmonica.tiny_models import dit_pipeline

    def run(pipe):
        generator = torch.Generator().manual_seed(0)
        return pipe(class_labels=[1], num_inference_steps=T, generator=generator, output_type="np").images

    def cached_pipeline():
        pipe = dit_pipeline()
        enable_cache(pipe, CacheSchedule.fora(T, len(units(pipe.transformer)), 2))
        return pipe

    expected = run(cached_pipeline())
    pipe = cached_pipeline()
    seen = {}

    def intrude(module, args, kwargs, output):
        if module._harmonica_cache.step == 1 and not seen:  # during the second step, once
            seen["started"] = True
            seen["box"] = _in_thread(lambda: run(pipe))

    hook = pipe.transformer.register_forward_hook(intrude, with_kwargs=True)
    got = run(pipe)
    hook.remove()
    error = seen["box"].get("error")
    assert isinstance(error, CacheStateError) and "another thread" in str(error), seen
    assert (got == expected).all()
