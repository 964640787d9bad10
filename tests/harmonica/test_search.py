"""search_schedule: greedy reuse by measured final-sample error, on tiny random DiTs."""

from __future__ import annotations

import pytest
import torch

from harmonica import CacheSchedule, Router, disable_cache, enable_cache, units
from harmonica.cache import attach_handle
from harmonica.sampling import sample
from harmonica.search import _Runner, exchange_steps, flip_costs, search_schedule
from harmonica.training import _ClassConditioning, _Group, _RoutedHandle, _Setup

from .tiny_models import ddim, tiny_dit

STEPS = 5


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield


def _engine_final(model, schedule, x, labels):
    """The cached engine's own sampling run (the product's path), as the independent oracle."""
    enable_cache(model, schedule)
    try:
        return sample(
            model, ddim(), labels, noise=x, num_inference_steps=STEPS, guidance_scale=1.5, clamp=False
        )
    finally:
        disable_cache(model)


def test_flip_costs_are_final_sample_errors_of_the_engine_with_that_entry_flipped():
    model = tiny_dit(num_layers=2)
    handle = _RoutedHandle(model, STEPS, write_threshold=0.5)
    conditioning = _ClassConditioning(model, None)
    setup = _Setup(model, handle, ddim(), conditioning, True, 1.5, torch.device("cpu"), _Group())
    attach_handle(model, handle)
    runner = _Runner(setup, STEPS, seed=0, batch_size=3)
    mask = CacheSchedule.fora(STEPS, len(units(model)), 2).compute
    full = torch.ones_like(mask)
    try:
        reference = runner.final(full)
        costs = flip_costs(runner, mask, reference, grow=True, max_age=None)
        base = runner.final(mask)
    finally:
        disable_cache(model)
    x, labels = runner.x, runner.cond
    torch.testing.assert_close(reference.float(), _engine_final(model, CacheSchedule(full), x, labels))
    torch.testing.assert_close(base.float(), _engine_final(model, CacheSchedule(mask), x, labels))
    assert set(costs) == {(t, k) for t in range(1, STEPS) for k in range(mask.shape[1]) if mask[t, k]}
    base_error = torch.nn.functional.mse_loss(base, reference).item()
    for t, k in [(2, 0), (4, 3)]:
        flipped = mask.clone()
        flipped[t, k] = False
        final = _engine_final(model, CacheSchedule(flipped), x, labels).double()
        expected = torch.nn.functional.mse_loss(final, reference).item() - base_error
        assert costs[(t, k)] == pytest.approx(expected, rel=1e-2)  # a difference of float32 MSEs


@pytest.mark.parametrize("fit", [True, False])
def test_engine_runs_of_candidates_continue_from_the_base_run_as_whole_runs_would(fit):
    from harmonica.search import _EngineRunner

    model = tiny_dit(num_layers=2)
    setup = _Setup(
        model, None, ddim(), _ClassConditioning(model, None), True, 1.5, torch.device("cpu"), _Group()
    )
    num_units = len(units(model))
    steps = 7
    base = CacheSchedule.fora(steps, num_units, 2, order=2).compute  # computes 0, 1, 2, 4, 6
    trials = []
    # first changed steps 4, 3, 2, 1; (2, 5) forecasts at order 1 at most: smaller caches, a whole run
    for i, j in [(4, 5), (6, 3), (2, 5), (1, 3)]:
        trial = base.clone()
        trial[i], trial[j] = False, True
        trials.append(trial)
    mixed = base.clone()
    mixed[5, 0] = True  # one unit computed at step 5
    trials += [mixed, base.clone(), torch.ones_like(base)]  # the last: no caches at all
    runner = _EngineRunner(setup, steps, 0, 2, 2, fit=fit)
    final, finals = runner.finals(base, trials)
    assert runner.forwards == steps + (3 + 4 + steps + 6) + 2 + steps
    for mask, got in [(base, final), *zip(trials, finals, strict=True)]:
        alone = _EngineRunner(setup, steps, 0, 2, 2, fit=fit)
        torch.testing.assert_close(got, alone.final(mask), rtol=0, atol=1e-6)
        schedule = runner.schedule(mask)
        assert schedule == alone.schedule(mask)
        torch.testing.assert_close(schedule.coefficients, alone.schedule(mask).coefficients)
        # what the fitting run sampled is what its fitted schedule samples at inference
        enable_cache(model, schedule)
        try:
            engine = sample(
                model,
                ddim(),
                runner.cond,
                noise=runner.x,
                num_inference_steps=steps,
                guidance_scale=1.5,
                clamp=False,
            )
        finally:
            disable_cache(model)
        torch.testing.assert_close(got.float(), engine, rtol=1e-4, atol=1e-5)
    if fit:
        assert not torch.equal(
            runner.schedule(base).coefficients, CacheSchedule(base).with_forecast(2).coefficients
        )
    assert model.__dict__.get("_harmonica_cache") is None


def _mean_log_error(final, reference):
    per_sample = [torch.mean((f.double() - r) ** 2).item() for f, r in zip(final, reference, strict=True)]
    return sum(torch.log(torch.tensor(v, dtype=torch.float64)).item() for v in per_sample) / len(per_sample)


def test_an_exchange_pass_keeps_the_swap_of_least_mean_log_error_and_leaves_mixed_steps_alone():
    steps = 6
    model = tiny_dit(num_layers=2)
    num_units = len(units(model))
    handle = _RoutedHandle(model, steps, write_threshold=0.5)
    setup = _Setup(
        model, handle, ddim(), _ClassConditioning(model, None), True, 1.5, torch.device("cpu"), _Group()
    )
    attach_handle(model, handle)
    runner = _Runner(setup, steps, seed=0, batch_size=3)
    mask = torch.ones(steps, num_units, dtype=torch.bool)
    mask[[2, 5]] = False  # steps 2 and 5 reused; 1, 3, 4 computed
    mask[3, 1] = False  # step 3 mixed: never exchanged
    full = torch.ones_like(mask)
    try:
        reference = runner.final(full)
        history = []
        one = exchange_steps(runner, mask, reference, passes=1, history=history)
    finally:
        disable_cache(model)

    def oracle_error(candidate):
        def final(m):
            return _engine_final(model, CacheSchedule(m), runner.x, runner.cond).double()

        with torch.no_grad():
            return _mean_log_error(final(candidate), final(full))

    swaps = []
    for i in (1, 4):
        for j in (2, 5):
            trial = mask.clone()
            trial[i], trial[j] = False, True
            swaps.append((oracle_error(trial), trial))
    best_error, best = min(swaps, key=lambda pair: pair[0])
    expected = best if best_error < oracle_error(mask) else mask
    assert torch.equal(one, expected)
    assert int((~one).sum()) == int((~mask).sum()) and torch.equal(one[3], mask[3])
    assert len(history) == (0 if expected is mask else 1)


def test_exchanges_never_break_the_age_cap_and_bad_counts_are_refused():
    model = tiny_dit(num_layers=1)
    result = search_schedule(
        model, ddim(), num_steps=6, target_cur=0.3, max_age=1, exchanges=2, batch_size=1, progress=False
    )
    assert result.schedule.max_age() <= 1 and result.router.training_settings["exchanges"] == 2
    total = 6 * len(units(model))
    assert result.schedule.cache_usage_ratio == pytest.approx(round(0.3 * total) / total)
    with pytest.raises(ValueError, match="exchanges is a number of exchange passes, an int >= 0, got -1"):
        search_schedule(model, ddim(), num_steps=6, target_cur=0.3, exchanges=-1, progress=False)


@pytest.mark.parametrize(("exchanges", "batch"), [(0, 8), (1, 16)])
def test_exchanges_measure_on_16_samples_by_default(exchanges, batch):
    """A pass keeps the best of many measured swaps: by default it measures on 16 samples, not 8."""
    result = search_schedule(
        tiny_dit(num_layers=1), ddim(), num_steps=4, target_cur=0.3, exchanges=exchanges, progress=False
    )
    assert result.router.training_settings["batch_size"] == batch


def test_search_reaches_each_target_exactly_and_encodes_it_as_a_router(tmp_path):
    model = tiny_dit(num_layers=2)
    num_units = len(units(model))
    result = search_schedule(
        model, ddim(), num_steps=STEPS, target_cur=[0.3, 0.5], rounds=3, batch_size=2, progress=False
    )
    total = STEPS * num_units
    for target, schedule in result.schedules.items():
        assert int((~schedule.compute).sum()) == round(target * total)
    low, high = result.schedules[0.3].compute, result.schedules[0.5].compute
    assert bool((high <= low).all())  # the second target extends the first
    assert result.schedule == result.schedules[0.5] and result.forwards > 0 and result.history
    result.router.save(tmp_path / "searched.safetensors")
    loaded = Router.load(tmp_path / "searched.safetensors", model=model)
    assert loaded.to_schedule() == result.schedule
    assert loaded.training_settings["method"] == "search"
    assert model.__dict__.get("_harmonica_cache") is None  # the model is left uncached


def test_search_respects_the_age_cap_and_polishes_a_router_down_to_its_target():
    model = tiny_dit(num_layers=1)
    capped = search_schedule(
        model, ddim(), num_steps=6, target_cur=0.45, max_age=1, batch_size=1, progress=False
    )
    assert capped.schedule.max_age() <= 1
    router = Router.for_model(model, 6, seed=0)
    with torch.no_grad():
        router.logits[1:] = -5.0  # caches every unit after step 0
    polished = search_schedule(
        model, ddim(), num_steps=6, target_cur=0.4, start=router, batch_size=1, progress=False
    )
    start = router.to_schedule().compute
    assert int((~polished.schedule.compute).sum()) == round(0.4 * 6 * len(units(model)))
    assert bool((polished.schedule.compute >= start).all())  # shrinking only turns reuses into computes


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(target_cur=1.5), ValueError, r"target_cur must be a cache usage ratio in \(0, 1\), got 1.5"),
        (dict(target_cur=0.3, max_age=0), ValueError, "max_age .* got 0"),
        (dict(target_cur=0.3, rounds=0), ValueError, "rounds must be an int >= 1, got 0"),
        (dict(target_cur=0.3, start=CacheSchedule.full(3, 2)), ValueError, "3 steps × 2 units"),
    ],
)
def test_search_bad_input(kwargs, error, match):
    with pytest.raises(error, match=match):
        search_schedule(tiny_dit(num_layers=1), ddim(), num_steps=STEPS, progress=False, **kwargs)


def test_search_refuses_a_model_without_units_and_a_cached_model():
    from harmonica.models import UnsupportedModelError

    with pytest.raises(UnsupportedModelError):
        search_schedule(torch.nn.Linear(2, 2), ddim(), num_steps=STEPS, target_cur=0.3, progress=False)
    model = tiny_dit(num_layers=1)
    enable_cache(model, CacheSchedule.full(STEPS, len(units(model))))
    with pytest.raises(Exception, match="disable_cache"):
        search_schedule(model, ddim(), num_steps=STEPS, target_cur=0.3, progress=False)
    disable_cache(model)


def test_cli_search_writes_a_schedule_router_and_refuses_bad_targets(tmp_path, capsys):
    from harmonica.cli import main
    from harmonica.reference import load_model

    out = tmp_path / "s.safetensors"
    args = [
        "search",
        "--steps",
        "4",
        "--target-cur",
        "0.25",
        "--batch",
        "1",
        "--rounds",
        "1",
        "--exchanges",
        "1",
    ]
    assert main([*args, "--threads", "1", "--out", str(out)]) == 0
    assert "cache usage ratio 25.0%" in capsys.readouterr().out
    router = Router.load(out, model=load_model())
    schedule = router.to_schedule()
    assert router.training_settings["exchanges"] == 1
    assert schedule.num_steps == 4 and schedule.cache_usage_ratio == pytest.approx(0.25)
    with pytest.raises(SystemExit) as exc:
        main(["search", "--steps", "4", "--target-cur", "1.5", "--out", str(out)])
    assert exc.value.code == 2 and "target_cur must be a cache usage ratio" in capsys.readouterr().err


def test_a_target_the_age_cap_forbids_is_reached_as_far_as_possible_and_said():
    with pytest.warns(UserWarning, match=r"reached a cache usage of 40.0% for the target 70.0%.*max_age=1"):
        result = search_schedule(
            tiny_dit(num_layers=1),
            ddim(),
            num_steps=5,
            target_cur=0.7,
            max_age=1,
            batch_size=1,
            progress=False,
        )
    assert result.schedule.max_age() == 1
