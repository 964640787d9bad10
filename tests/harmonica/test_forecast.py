"""Forecast entries: CacheSchedule orders and coefficients, and the engine against an oracle that
extrapolates the recorded unit outputs itself."""

from __future__ import annotations

import pytest
import torch

from harmonica import CacheSchedule, enable_cache, units
from harmonica.schedule import forecast_coefficients

from .test_engine import FP32, make_cond, make_model, noise
from .tiny_models import ReferenceCache, ddim, sample, tiny_dit

FORECAST_STEPS = 9


# ---------------------------------------------------------------------------------------------
# The schedule


def test_forecasting_fora_takes_taylorseers_static_form():
    # diffusers' TaylorSeer (cache_interval N, disable_cache_before_step 3) computes steps 0-2, then the
    # steps where (t - 3 - 1) % N == 0: step 3 is already forecast from the warm-up
    computed = [t for t in range(20) if CacheSchedule.fora(20, 1, 3, order=1).compute[t, 0]]
    assert computed == [0, 1, 2, 4, 7, 10, 13, 16, 19]
    assert CacheSchedule.fora(20, 1, 3, order=2, warmup=0) == CacheSchedule.fora(20, 1, 3).with_forecast(2)
    assert CacheSchedule.fora(20, 1, 3, order=0, warmup=3).compute[:3].all()
    with pytest.raises(ValueError, match="warmup"):
        CacheSchedule.fora(20, 1, 3, order=1, warmup=-1)


def test_fora_orders_rise_as_history_fills():
    schedule = CacheSchedule.fora(10, 2, 3, order=2, warmup=0)
    # computes at 0, 3, 6, 9: after one compute only plain reuse, after two first order, then second
    assert [row[0] for row in schedule.order_rows] == [0, 0, 0, 0, 1, 1, 0, 2, 2, 0]
    assert schedule.history_sizes == (3, 3)
    assert schedule.forecasts
    assert CacheSchedule.fora(10, 2, 3, order=0) == CacheSchedule.fora(10, 2, 3)
    assert not CacheSchedule.fora(10, 2, 3).forecasts
    assert CacheSchedule.fora(10, 2, 3).history_sizes == (1, 1)
    assert CacheSchedule.full(10, 2).history_sizes == (0, 0)


@pytest.mark.parametrize("interval", [2, 3, 4])
def test_equal_spacing_gives_the_taylorseer_coefficients(interval):
    schedule = CacheSchedule.fora(4 * interval, 1, interval, order=2, warmup=0)
    table = schedule.coefficients
    for t in range(3 * interval + 1, 4 * interval):  # history full: second order
        k = t % interval
        a, b = table[t, 0].tolist()
        assert a == pytest.approx(k / interval)
        assert b == pytest.approx(k * k / (2 * interval * interval))


def test_newton_rule_interpolates_a_quadratic_exactly():
    compute = torch.tensor([True, False, True, True, False, False, True, False, False, False])[:, None]
    orders = torch.tensor([0, 0, 0, 0, 1, 1, 0, 2, 2, 2], dtype=torch.int8)[:, None]
    table = forecast_coefficients(compute, orders, rule="newton")

    def f(t: float) -> float:
        return 0.3 * t * t - 2 * t + 1

    # Newton through the last computes at (6, 3, 2) reproduces f; order 1 through (3, 2) a line.
    for t in (7, 8, 9):
        a, b = table[t, 0].tolist()
        c0, c1, c2 = f(6), f(3), f(2)
        assert c0 + a * (c0 - c1) + b * (c0 - 2 * c1 + c2) == pytest.approx(f(t))
    a, b = table[5, 0].tolist()
    assert b == 0 and f(3) + a * (f(3) - f(2)) == pytest.approx(f(3) + 2 * (f(3) - f(2)))


def test_rule_in_other_times_measures_the_distances_there():
    """The Taylor rule with ``times``: a quadratic in that time, sampled at uneven times, is
    extrapolated as the rule's definition says (derivatives from backward differences in time)."""
    compute = torch.tensor([True, True, True, False, True, False, False])[:, None]
    times = [0.0, 1.5, 2.0, 2.75, 3.0, 3.2, 4.5]
    schedule = CacheSchedule(compute).with_forecast(2, times=times)
    for t, (s0, s1, s2) in ((3, (2, 1, 0)), (5, (4, 2, 1)), (6, (4, 2, 1))):
        d, h0, h1 = times[t] - times[s0], times[s0] - times[s1], times[s1] - times[s2]
        c0, c1, c2 = torch.randn(3, dtype=torch.float64).tolist()
        slope = (c0 - c1) / h0
        curvature = (slope - (c1 - c2) / h1) / h0
        a, b = schedule.coefficients[t, 0].tolist()
        expected = c0 + d * slope + d * d / 2 * curvature
        assert c0 + a * (c0 - c1) + b * (c0 - 2 * c1 + c2) == pytest.approx(expected)
    # in step-index times the table is the default one
    assert torch.equal(
        CacheSchedule.fora(20, 2, 3, order=2, times=list(range(20))).coefficients,
        CacheSchedule.fora(20, 2, 3, order=2).coefficients,
    )
    with pytest.raises(ValueError, match="one value per step: 7 expected, got 6"):
        CacheSchedule(compute).with_forecast(2, times=times[:6])
    with pytest.raises(ValueError, match="strictly monotonic"):
        CacheSchedule(compute).with_forecast(2, times=[0, 1, 1, 2, 3, 4, 5])
    with pytest.raises(ValueError, match="finite"):
        CacheSchedule(compute).with_forecast(2, times=[0, 1, 2, 3, 4, 5, float("inf")])


def test_scheduler_blends_the_rule_in_step_index_and_in_the_samplers_log_snr():
    """``scheduler=``: each forecast is the mean of the two rules' forecasts, i.e. the mean of their
    coefficient tables (the forecast is linear in them); reuse entries and computes stay zero."""
    from diffusers import DDIMScheduler, FlowMatchEulerDiscreteScheduler

    from harmonica.schedule import log_snr_times

    for sampler in (
        DDIMScheduler(beta_schedule="squaredcos_cap_v2"),
        FlowMatchEulerDiscreteScheduler(shift=3.0),
    ):
        for order in (1, 2):
            blend = CacheSchedule.fora(13, 3, 3, order=order, scheduler=sampler)
            step = CacheSchedule.fora(13, 3, 3, order=order)
            lsnr = CacheSchedule.fora(13, 3, 3, order=order, times=log_snr_times(sampler, 13))
            assert torch.equal(blend.compute, step.compute) and torch.equal(blend.orders, step.orders)
            torch.testing.assert_close(blend.coefficients, (step.coefficients + lsnr.coefficients) / 2)
            assert not torch.allclose(blend.coefficients, step.coefficients)
    assert torch.equal(
        CacheSchedule.fora(13, 3, 3, scheduler=DDIMScheduler()).coefficients, torch.zeros(13, 3, 2)
    )
    with pytest.raises(ValueError, match="pass times= or scheduler=, not both"):
        CacheSchedule.fora(13, 3, 3, order=2, times=list(range(13)), scheduler=DDIMScheduler())
    with pytest.raises(ValueError, match="pass it as times="):  # FLUX's resolution-dependent sampler
        CacheSchedule.fora(
            13, 3, 3, order=2, scheduler=FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True)
        )


def test_log_snr_times_of_ddim_and_flow_matching_samplers():
    from diffusers import DDIMScheduler, FlowMatchEulerDiscreteScheduler

    from harmonica.schedule import log_snr_times

    ddim_sampler = DDIMScheduler()
    lam = torch.tensor(log_snr_times(ddim_sampler, 10), dtype=torch.float64)
    ddim_sampler.set_timesteps(10)
    alpha = ddim_sampler.alphas_cumprod[ddim_sampler.timesteps].double()
    assert torch.allclose(lam, 0.5 * torch.log(alpha / (1 - alpha)))
    assert bool((lam.diff() > 0).all())  # noise falls along the run
    flow = FlowMatchEulerDiscreteScheduler(shift=3.0)
    lam = torch.tensor(log_snr_times(flow, 10), dtype=torch.float64)
    flow.set_timesteps(10)
    sigma = flow.sigmas[:10].double().clamp(1e-4, 1 - 1e-4)
    assert torch.allclose(lam, torch.log((1 - sigma) / sigma))
    assert flow.timesteps.numel() == 10 and lam[0] == pytest.approx(
        torch.log(torch.tensor(1e-4 / (1 - 1e-4))).item()
    )
    # Wan's sampler: UniPC over flow sigmas, with an alphas_cumprod of betas that the run never uses
    from diffusers import UniPCMultistepScheduler

    unipc = UniPCMultistepScheduler(use_flow_sigmas=True, prediction_type="flow_prediction", flow_shift=3.0)
    lam = torch.tensor(log_snr_times(unipc, 10), dtype=torch.float64)
    unipc.set_timesteps(10)
    sigma = unipc.sigmas[:10].double().clamp(1e-4, 1 - 1e-4)
    assert torch.allclose(lam, torch.log((1 - sigma) / sigma)) and bool((lam.diff() > 0).all())
    dynamic = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True)
    with pytest.raises(
        ValueError, match="mu.* compute the log-SNR of its steps yourself and pass it as times="
    ):
        log_snr_times(dynamic, 10)


def test_max_age_keeps_orders_where_the_entry_stays_reused():
    schedule = CacheSchedule.fora(12, 2, 4, order=1, warmup=0).with_max_age(2)
    assert schedule.max_age() == 2
    assert schedule.forecasts
    orders = schedule.orders
    assert bool((orders[schedule.compute] == 0).all())


@pytest.mark.parametrize(
    ("orders", "message"),
    [
        (torch.full((4, 2), 3), "0 \\(plain reuse\\), 1 or 2"),
        (torch.ones(4, 2, dtype=torch.long), "is computed but has forecast order"),
        (torch.tensor([[0, 0], [2, 2], [0, 0], [0, 0]]), "needs k \\+ 1 earlier computes"),
        (torch.zeros(4, 3, dtype=torch.long), "must match the schedule's shape"),
        (torch.zeros(4, 2), "integers"),
    ],
)
def test_bad_orders_are_refused(orders, message):
    compute = torch.tensor([[True, True], [False, False], [True, True], [False, False]])
    if "is computed" in message:
        orders = torch.zeros(4, 2, dtype=torch.long)
        orders[0, 0] = 1
    with pytest.raises((ValueError, TypeError), match=message):
        CacheSchedule(compute, orders)


def test_bad_order_and_coefficients_are_refused():
    with pytest.raises(ValueError, match="forecast order: 0"):
        CacheSchedule.fora(8, 2, 2, order=3)
    schedule = CacheSchedule.fora(8, 2, 2, order=1)
    with pytest.raises(ValueError, match=r"\[T, U, 2\]"):
        schedule.with_coefficients(torch.zeros(8, 2))
    nonzero = torch.ones(8, 2, 2, dtype=torch.float64)
    with pytest.raises(ValueError, match="not forecast"):
        schedule.with_coefficients(nonzero)
    with pytest.raises(ValueError, match="finite"):
        schedule.with_coefficients(torch.full((8, 2, 2), float("nan")))


# ---------------------------------------------------------------------------------------------
# The engine against the oracle


def _oracle_sample(model, schedule, cond, mask, rule, cache_dtype=None, batch=2):
    oracle = ReferenceCache(
        model,
        schedule.compute,
        cache_dtype=cache_dtype,
        orders=schedule.orders,
        rule=rule,
        coefficients=None if rule in ("taylor", "newton") else schedule.coefficients,
    )
    try:
        return sample(model, ddim(), noise(batch), cond, schedule.num_steps, text_mask=mask)
    finally:
        oracle.remove()


@pytest.mark.parametrize("kind", ["dit", "pixart"])
@pytest.mark.parametrize(
    ("interval", "order", "rule"), [(2, 1, "taylor"), (3, 2, "taylor"), (3, 2, "newton")]
)
def test_fora_forecast_matches_the_oracle(kind, interval, order, rule):
    model = make_model(kind)
    num_units = len(units(model))
    schedule = CacheSchedule.fora(FORECAST_STEPS, num_units, interval, order=order, rule=rule)
    cond, mask = make_cond(kind, 2)
    with torch.no_grad():
        expected = _oracle_sample(model, schedule, cond, mask, rule)
        plain = _oracle_sample(model, CacheSchedule(schedule.compute), cond, mask, rule)
        handle = enable_cache(model, schedule)
        got = sample(model, ddim(), noise(2), cond, FORECAST_STEPS, text_mask=mask)
    torch.testing.assert_close(got, expected, **FP32)
    assert not torch.allclose(got, plain, atol=1e-4), "forecasting must differ from plain reuse"
    assert handle.step == FORECAST_STEPS


@pytest.mark.parametrize("kind", ["dit", "pixart"])
@pytest.mark.parametrize("rule", ["taylor", "newton", "given"])
def test_random_mask_matches_the_oracle(kind, rule):
    """Unevenly spaced computes: the rules differ here, and given (learned) coefficients apply."""
    model = make_model(kind)
    num_units = len(units(model))
    g = torch.Generator().manual_seed(3)
    mask = torch.rand(FORECAST_STEPS, num_units, generator=g) > 0.5
    mask[0] = True
    schedule = CacheSchedule.from_mask(mask).with_forecast(2, rule="newton" if rule == "newton" else "taylor")
    if rule == "given":
        coefficients = torch.rand(FORECAST_STEPS, num_units, 2, generator=g, dtype=torch.float64) - 0.5
        coefficients[schedule.orders == 0] = 0
        coefficients[..., 1][schedule.orders == 1] = 0
        learned = schedule.with_coefficients(coefficients)
        assert learned != schedule
        schedule = learned
    assert int(schedule.orders.max()) == 2
    cond, mask_ = make_cond(kind, 2)
    with torch.no_grad():
        expected = _oracle_sample(model, schedule, cond, mask_, rule=rule)
        enable_cache(model, schedule)
        got = sample(model, ddim(), noise(2), cond, FORECAST_STEPS, text_mask=mask_)
    torch.testing.assert_close(got, expected, **FP32)


@pytest.mark.parametrize("kind", ["dit", "pixart"])
def test_bf16_history_under_fp32_model(kind):
    model = make_model(kind)
    num_units = len(units(model))
    schedule = CacheSchedule.fora(FORECAST_STEPS, num_units, 3, order=2)
    cond, mask = make_cond(kind, 2)
    with torch.no_grad():
        expected = _oracle_sample(model, schedule, cond, mask, "taylor", cache_dtype=torch.bfloat16)
        handle = enable_cache(model, schedule, cache_dtype=torch.bfloat16)
        got = sample(model, ddim(), noise(2), cond, FORECAST_STEPS, text_mask=mask)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    # three bf16 [B·2 (CFG), N, D] buffers per unit
    tokens, width = 16, 32
    assert handle.cache_bytes == num_units * 3 * 4 * tokens * width * 2


def test_a_history_dtype_narrower_than_the_activations_is_refused():
    model = tiny_dit()
    enable_cache(
        model, CacheSchedule.fora(FORECAST_STEPS, len(units(model)), 3, order=2), cache_dtype=torch.float16
    )
    cond, _ = make_cond("dit", 2)
    with torch.no_grad(), pytest.raises(TypeError, match="float16 cannot hold torch.float32"):
        sample(model, ddim(), noise(2), cond, FORECAST_STEPS)


def test_history_is_reallocated_when_the_batch_changes_between_generations():
    model = tiny_dit()
    schedule = CacheSchedule.fora(FORECAST_STEPS, len(units(model)), 3, order=2)
    conds = {batch: make_cond("dit", batch)[0] for batch in (2, 3)}
    with torch.no_grad():
        expected = {
            batch: _oracle_sample(model, schedule, cond, None, "taylor", batch=batch)
            for batch, cond in conds.items()
        }
        enable_cache(model, schedule)
        for batch in (2, 3, 2):
            got = sample(model, ddim(), noise(batch), conds[batch], FORECAST_STEPS)
            torch.testing.assert_close(got, expected[batch], **FP32)


def test_compiled_forecast_steps_match_eager_with_one_graph_per_distinct_row():
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    model = tiny_dit()
    num_units = len(units(model))
    schedule = CacheSchedule.fora(FORECAST_STEPS, num_units, 3, order=2, warmup=0)
    cond, _ = make_cond("dit", 2)
    handle = enable_cache(model, schedule)
    with torch.no_grad():
        eager = sample(model, ddim(), noise(2), cond, FORECAST_STEPS)
        counter = CompileCounterWithBackend("eager")
        compiled = torch.compile(model, backend=counter, fullgraph=True)
        handle.reset()
        got = sample(compiled, ddim(), noise(2), cond, FORECAST_STEPS)
    distinct = len({(r, o) for r, o in zip(schedule.rows, schedule.order_rows, strict=True)})
    # compute-all, reuse-all, first-order and second-order rows: the coefficients are device data
    assert distinct == 4
    assert counter.frame_count == distinct
    torch.testing.assert_close(got, eager, **FP32)
    torch._dynamo.reset()


# ---------------------------------------------------------------------------------------------
# Fitted coefficients, forecast search, routers that carry a forecast


def test_fit_forecast_solves_each_entrys_least_squares_on_the_cached_run():
    from harmonica import fit_forecast
    from harmonica.training import _ClassConditioning, _draw, _generator, _Group, _Setup

    model = tiny_dit()
    schedule = CacheSchedule.fora(FORECAST_STEPS, len(units(model)), 3, order=2)
    fit = fit_forecast(model, ddim(), schedule, batch_size=3, ridge=0.1, progress=False)
    setup = _Setup(
        model, None, ddim(), _ClassConditioning(model, None), True, 1.5, torch.device("cpu"), _Group()
    )
    setup.scheduler.set_timesteps(FORECAST_STEPS)
    x, labels = _draw(setup, _generator(0, 5, 0), 3)
    expected = schedule.coefficients
    oracle = ReferenceCache(
        model, schedule.compute, orders=schedule.orders, coefficients=expected, fit_ridge=0.1
    )
    try:
        sample(model, ddim(), x, labels, FORECAST_STEPS)
    finally:
        oracle.remove()
    assert fit.schedule.compute.equal(schedule.compute) and fit.schedule.orders.equal(schedule.orders)
    torch.testing.assert_close(fit.schedule.coefficients, expected, rtol=1e-4, atol=1e-6)
    assert not torch.allclose(fit.schedule.coefficients, schedule.coefficients)
    finite = fit.residual[torch.isfinite(fit.residual)]
    assert finite.numel() == int((schedule.orders > 0).sum()) and bool((finite <= 1 + 1e-6).all())


def test_fit_forecast_bad_input():
    from harmonica import fit_forecast

    model = tiny_dit()
    num_units = len(units(model))
    with pytest.raises(ValueError, match="forecasts no entry"):
        fit_forecast(model, ddim(), CacheSchedule.fora(FORECAST_STEPS, num_units, 2), progress=False)
    with pytest.raises(ValueError, match="units"):
        fit_forecast(
            model, ddim(), CacheSchedule.fora(FORECAST_STEPS, num_units + 1, 2, order=1), progress=False
        )
    with pytest.raises(ValueError, match="batch_size"):
        fit_forecast(model, ddim(), CacheSchedule.fora(FORECAST_STEPS, num_units, 2, order=1), batch_size=0)
    with pytest.raises(ValueError, match="guidance_scale_2 is the low-noise stage's scale"):
        fit_forecast(
            model, ddim(), CacheSchedule.fora(FORECAST_STEPS, num_units, 2, order=1), guidance_scale_2=3.0
        )


def test_forecast_search_reaches_the_target_and_its_router_round_trips(tmp_path):
    from harmonica import Router, search_schedule

    model = tiny_dit(num_layers=2)
    result = search_schedule(
        model, ddim(), num_steps=6, target_cur=0.5, forecast_order=2, batch_size=2, progress=False
    )
    schedule = result.schedule
    assert schedule.cache_usage_ratio == pytest.approx(0.5)
    assert schedule.forecasts
    path = tmp_path / "r.safetensors"
    result.router.save(path)
    loaded = Router.load(path, model=model)
    assert loaded.to_schedule() == schedule
    with pytest.warns(UserWarning, match="step-distance"):
        other = loaded.to_schedule(threshold=0.999)  # every entry computed but row 0's pin
    assert not other.forecasts


def test_router_with_a_broken_forecast_is_refused(tmp_path):
    from safetensors.torch import load_file, save_file

    from harmonica import Router
    from harmonica.search import schedule_router

    model = tiny_dit()
    schedule = CacheSchedule.fora(FORECAST_STEPS, len(units(model)), 3, order=2)
    router = schedule_router(model, schedule, ddim(), {})
    path = tmp_path / "r.safetensors"
    router.save(path)
    assert Router.load(path).to_schedule() == schedule
    tensors = load_file(path)
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata()
    tensors["forecast_orders"][1, 0] = 2  # step 1 has one compute of history: order 2 impossible
    save_file(tensors, tmp_path / "bad.safetensors", metadata=metadata)
    with pytest.raises(ValueError, match="stored forecast schedule is invalid"):
        Router.load(tmp_path / "bad.safetensors")
    del tensors["forecast_coefficients"]
    save_file(tensors, tmp_path / "missing.safetensors", metadata=metadata)
    with pytest.raises(ValueError, match="tensors are missing"):
        Router.load(tmp_path / "missing.safetensors")


def test_cli_fit_writes_a_router_carrying_the_fitted_forecast(tmp_path, capsys):
    from harmonica import Router
    from harmonica.cli import main
    from harmonica.reference import load_model

    out = tmp_path / "f.safetensors"
    assert (
        main(["fit", "--fora", "2", "--steps", "6", "--batch", "2", "--threads", "1", "--out", str(out)]) == 0
    )
    assert "cache usage ratio" in capsys.readouterr().out
    model = load_model()
    schedule = Router.load(out, model=model).to_schedule()
    expected = CacheSchedule.fora(6, len(units(model)), 2, order=2)
    assert schedule.compute.equal(expected.compute) and schedule.orders.equal(expected.orders)
    assert not torch.equal(schedule.coefficients, expected.coefficients)  # fitted, not the rule's
    with pytest.raises(SystemExit) as exc:
        main(["fit", "--fora", "2", "--order", "3", "--out", str(out)])
    assert exc.value.code == 2


def test_cli_fit_even_steps_after_a_warmup(tmp_path, capsys):
    from harmonica import Router
    from harmonica.cli import main
    from harmonica.reference import load_model

    out = tmp_path / "even.safetensors"
    args = ["fit", "--even", "0.4", "--warmup", "3", "--steps", "10", "--batch", "2", "--threads", "1"]
    assert main([*args, "--out", str(out)]) == 0
    assert "cache usage ratio 40.0%" in capsys.readouterr().out
    model = load_model()
    schedule = Router.load(out, model=model).to_schedule()
    expected = CacheSchedule.even_steps(10, len(units(model)), 0.4, warmup=3).with_forecast(2)
    assert schedule.compute.equal(expected.compute) and schedule.orders.equal(expected.orders)
    assert not schedule.compute[:3].logical_not().any()
    with pytest.raises(SystemExit) as exc:
        main(["fit", "--even", "1.2", "--steps", "10", "--out", str(tmp_path / "bad.safetensors")])
    assert (
        exc.value.code == 2 and "usage is a cache usage ratio in [0, 1), got 1.2" in capsys.readouterr().err
    )
    assert not (tmp_path / "bad.safetensors").exists()
