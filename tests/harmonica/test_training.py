"""Router training (SDT + IEPO, L2C) on tiny random models: the soft forward, λ, the optimiser loop,
budget mode, checkpoints and resume, L2C's pinned refresh steps, torchrun, the CLI and bad input."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from harmonica import CacheSchedule, Router, disable_cache, enable_cache, units
from harmonica.cache import attach_handle
from harmonica.training import (
    _ClassConditioning,
    _Group,
    _RoutedHandle,
    _sample,
    _Setup,
    estimate_lambda,
    train_router,
)

from .tiny_models import CAPTION_CHANNELS, TEXT_TOKENS, ddim, tiny_dit, tiny_pixart

STEPS = 5
PUBLISHED = dict(straight_through=False, max_age=None, tie_steps=False, forecast_order=0)
"""The paper's method (train_router's defaults add straight-through, an age cap and tied steps)."""


def _setup(model, scheduler=None, guidance=1.5, steps=STEPS, forecast_order=0) -> _Setup:
    handle = _RoutedHandle(model, steps, 0.1, forecast_order)
    attach_handle(model, handle)
    return _Setup(
        model=model,
        handle=handle,
        scheduler=scheduler or ddim(),
        conditioning=_ClassConditioning(model, None),
        cfg=guidance > 1,
        guidance_scale=guidance,
        device=torch.device("cpu"),
        group=_Group(),
    )


def _call(setup: _Setup, x, labels, step, t):
    setup.handle._step = step
    return setup.conditioning.call(setup.model, x, t, labels, setup.cfg)


@pytest.fixture
def dit():
    model = tiny_dit(num_layers=3)
    yield model
    disable_cache(model)


def test_soft_forward_blends_branch_and_cache_per_unit(dit):
    """r = 1 is the uncached model; r = 0 is the engine's all-reuse step on the same cache;
    r in between is linear in r for a single routed unit (the blend enters additively)."""
    setup = _setup(dit, guidance=1.0)
    handle = setup.handle
    gen = torch.Generator().manual_seed(0)
    x0, x1 = torch.randn(2, 2, 4, 8, 8, generator=gen)
    labels = torch.tensor([3, 7])
    t0, t1 = torch.tensor(900), torch.tensor(700)
    handle.reset()
    handle.set_mode("fill")
    with torch.no_grad():
        _call(setup, x0, labels, 0, t0)
        cache_after_fill = handle.snapshot()
        handle.set_mode("teacher")
        teacher = _call(setup, x1, labels, 1, t1)
        handle.set_soft(torch.ones(len(units(dit))), defer_writes=True)
        soft_one = _call(setup, x1, labels, 1, t1)
        handle.set_soft(torch.zeros(len(units(dit))), defer_writes=True)
        soft_zero = _call(setup, x1, labels, 1, t1)
    torch.testing.assert_close(soft_one, teacher, rtol=1e-5, atol=1e-5)
    disable_cache(dit)

    # The engine: step 0 computes everything from x0, step 1 reuses everything.
    compute = torch.ones(STEPS, len(units(dit)), dtype=torch.bool)
    compute[1] = False
    enable_cache(dit, CacheSchedule.from_mask(compute))
    with torch.no_grad():
        dit(x0, timestep=t0.expand(2), class_labels=labels)
        engine_reuse = dit(x1, timestep=t1.expand(2), class_labels=labels).sample[:, :4]
    torch.testing.assert_close(soft_zero, engine_reuse, rtol=1e-5, atol=1e-5)
    for a, b in zip(cache_after_fill[0], dit._harmonica_cache._buffers, strict=True):
        torch.testing.assert_close(a, b)


def test_gradient_reaches_every_logit_and_matches_finite_differences():
    """d loss / d logits through the whole routed forward (the active op backend's backward),
    against central differences (float32 with a wide step: the loss is smooth in the logits)."""
    model = tiny_dit(num_layers=2)
    setup = _setup(model, guidance=1.0)
    handle = setup.handle
    gen = torch.Generator().manual_seed(1)
    x0, x1 = torch.randn(2, 2, 4, 8, 8, generator=gen)
    labels = torch.tensor([1, 2])
    handle.reset()
    handle.set_mode("fill")
    with torch.no_grad():
        _call(setup, x0, labels, 0, torch.tensor(900))
        handle.set_mode("teacher")
        teacher = _call(setup, x1, labels, 1, torch.tensor(700))
    _check_logit_gradient(setup, x1, labels, 1, torch.tensor(700), teacher, gen)
    disable_cache(model)


def _check_logit_gradient(setup, x, labels, step, t, teacher, gen):
    """d MSE(routed step, teacher) / d logits against central differences, at random logits."""
    handle = setup.handle
    logits = torch.randn(len(handle.unit_names), generator=gen, requires_grad=True)

    def loss_of(lg):
        handle.set_soft(torch.sigmoid(lg), defer_writes=True)
        out = _call(setup, x, labels, step, t)
        handle.pending = {}
        return torch.nn.functional.mse_loss(out, teacher)

    (grad,) = torch.autograd.grad(loss_of(logits), logits)
    assert (grad != 0).all()
    eps = 1e-2
    for k in range(logits.numel()):
        bump = torch.zeros_like(logits)
        bump[k] = eps
        with torch.no_grad():
            numeric = (loss_of(logits + bump) - loss_of(logits - bump)) / (2 * eps)
        torch.testing.assert_close(grad[k], numeric, rtol=2e-2, atol=1e-3 * grad.abs().max().item())


def test_cache_writes_follow_the_write_threshold(dit):
    setup = _setup(dit, guidance=1.0)
    handle = setup.handle
    x = torch.randn(2, 4, 8, 8)
    labels = torch.tensor([0, 1])
    handle.reset()
    handle.set_mode("fill")
    with torch.no_grad():
        _call(setup, x, labels, 0, torch.tensor(900))
    before = handle.snapshot()[0]  # the newest writes
    r = torch.full((len(units(dit)),), 0.05)
    r[0], r[2] = 0.6, 0.099  # above and just below the threshold 0.1
    handle.set_soft(r, defer_writes=True)
    with torch.no_grad():
        _call(setup, x * 0.5, labels, 1, torch.tensor(700))
    assert set(handle.pending) == {0}
    for k, (a, b) in enumerate(zip(before, handle._buffers, strict=True)):
        torch.testing.assert_close(a, b, msg=f"unit {k} written before commit")
    mixed = handle.pending[0]
    r[0] = 1.0  # the fresh branch output, for the expected blend
    handle.set_soft(r, defer_writes=True)
    with torch.no_grad():
        _call(setup, x * 0.5, labels, 1, torch.tensor(700))
    branch = handle.pending[0]
    torch.testing.assert_close(mixed, before[0] + 0.6 * (branch - before[0]))
    handle.pending = {0: mixed}
    handle.commit_writes()
    assert not torch.equal(before[0], handle._buffers[0])
    for k in range(1, len(before)):
        torch.testing.assert_close(before[k], handle._buffers[k])


def _floored(values: torch.Tensor) -> torch.Tensor:
    return values.clamp_min(0.01 * values.mean()).float()


@pytest.mark.parametrize("hard", [False, True], ids=["soft-router", "hard-schedule"])
def test_marginal_lambda_is_the_distance_between_successive_final_samples(dit, hard):
    """The released code's λ_t = MSE(x0^{≤t}, x0^{≤t−1}): final samples of two runs from the same noise
    that enable the router on steps 1…t and 1…t−1 (x0^{≤0} uncached), each run here from scratch."""
    setup = _setup(dit)
    gen = torch.Generator().manual_seed(2)
    probabilities = torch.sigmoid(torch.randn(STEPS, len(units(dit)), generator=gen) - 1)
    if hard:
        probabilities = (probabilities > 0.3).float()
    x = torch.randn(3, 4, 8, 8, generator=gen)
    labels = torch.tensor([4, 5, 6])
    lam = estimate_lambda(setup, probabilities, x, labels, "marginal")
    finals = [_sample(setup, x, labels, probabilities, lambda i, t=t: 1 <= i <= t) for t in range(STEPS)]
    pairs = zip(finals[1:], finals[:-1], strict=True)
    distances = torch.tensor([torch.nn.functional.mse_loss(a.double(), b.double()).item() for a, b in pairs])
    assert lam[0] == 0 and (lam[1:] > 0).all()
    torch.testing.assert_close(lam[1:], _floored(distances), rtol=1e-4, atol=1e-12)


def test_leave_one_out_lambda_matches_independent_runs(dit):
    setup = _setup(dit)
    gen = torch.Generator().manual_seed(3)
    probabilities = torch.sigmoid(torch.randn(STEPS, len(units(dit)), generator=gen) - 1)
    x = torch.randn(2, 4, 8, 8, generator=gen)
    labels = torch.tensor([4, 5])
    lam = estimate_lambda(setup, probabilities, x, labels, "leave_one_out")
    soft = _sample(setup, x, labels, probabilities, lambda i: True)
    expected = []
    for t in range(1, STEPS):
        forced = _sample(setup, x, labels, probabilities, lambda i, t=t: i != t)
        expected.append(torch.nn.functional.mse_loss(forced.double(), soft.double()).item())
    torch.testing.assert_close(lam[1:], _floored(torch.tensor(expected)), rtol=1e-4, atol=1e-12)


def test_leave_one_out_lambda_keeps_the_caches_every_sqrt_t_steps(dit, monkeypatch):
    """T = 10: 4 copies of the caches (before steps 0, 3, 6 and 9), not one per step, and λ equal to
    the one computed from a copy per step (the steps between are run again, the same way)."""
    import harmonica.training as training

    steps = 10
    gen = torch.Generator().manual_seed(8)
    probabilities = torch.sigmoid(torch.randn(steps, len(units(dit)), generator=gen) - 1)
    x = torch.randn(2, 4, 8, 8, generator=gen)
    labels = torch.tensor([2, 7])
    lams, copies = [], []
    snapshot = _RoutedHandle.snapshot
    for stride_of in (math.isqrt, lambda n: 1):
        monkeypatch.setattr(training.math, "isqrt", stride_of)
        setup = _setup(dit, steps=steps)
        made = []
        monkeypatch.setattr(
            setup.handle,
            "snapshot",
            lambda handle=setup.handle, made=made: made.append(1) or snapshot(handle),
        )
        lams.append(estimate_lambda(setup, probabilities, x, labels, "leave_one_out"))
        copies.append(len(made))
        disable_cache(dit)
    assert copies == [4, steps]
    assert torch.equal(lams[0], lams[1])


def test_training_pulls_logits_by_the_budget_term():
    """β = 0: only fidelity, r rises (nothing cached); a large β: r falls (much cached)."""
    scheduler = ddim()
    common = dict(
        num_steps=STEPS, iterations=4 * (STEPS - 1), batch_size=2, lr=1.0, progress=False, **PUBLISHED
    )
    keep = train_router(tiny_dit(), scheduler, beta=0.0, lambda_variant="none", **common)
    cache = train_router(tiny_dit(), scheduler, beta=1.0, lambda_variant="none", **common)
    start = Router.for_model(tiny_dit(), STEPS).logits[1:]
    assert (keep.router.logits[1:] > start).float().mean() > 0.9
    assert (cache.router.logits[1:] < start).all()
    assert keep.router.to_schedule().cache_usage_ratio == 0
    assert cache.router.to_schedule().cache_usage_ratio > 0.5
    assert len(keep.history) == 4 and keep.iterations == 16


def test_budget_mode_steers_beta_by_the_cache_usage_ratio():
    target = 0.5
    result = train_router(
        tiny_dit(num_layers=1),
        ddim(),
        num_steps=STEPS,
        iterations=14 * (STEPS - 1),
        batch_size=1,
        lr=0.5,
        target_cur=target,
        lambda_every=7 * (STEPS - 1),
        progress=False,
        **PUBLISHED,
    )
    history = result.history
    assert history[0]["cur"] < 0.2
    assert result.router.training_settings["target_cur"] == target
    # The trained order is kept and one shift of the logits sets the budget.
    assert abs(result.router.to_schedule().cache_usage_ratio - target) <= 0.02
    # After the probe round, β rises in a round that ends under the target and falls over it.
    for before, after in zip(history, history[1:], strict=False):
        if after["cur"] < target - 0.01:
            assert after["beta"] > before["beta"]
        elif after["cur"] > target + 0.01:
            assert after["beta"] < before["beta"]


def test_router_metadata_save_load_enable(tmp_path):
    model = tiny_dit()
    result = train_router(
        model, ddim(), num_steps=STEPS, iterations=STEPS - 1, batch_size=2, lambda_every=100, progress=False
    )
    settings = result.router.training_settings
    for key in ("method", "num_steps", "beta", "lambda_every", "threshold", "cur", "training_seconds", "lr"):
        assert key in settings
    assert settings["method"] == "harmonica" and settings["num_steps"] == STEPS
    assert result.router.sampler["class"] == "DDIMScheduler"
    path = tmp_path / "router.safetensors"
    result.router.save(path)
    loaded = Router.load(path, model=model)
    torch.testing.assert_close(loaded.logits, result.router.logits)
    assert loaded.training_settings["cur"] == settings["cur"]
    handle = enable_cache(model, loaded)
    assert handle.schedule.num_steps == STEPS
    disable_cache(model)
    assert all(not p.requires_grad for p in []) and all(p.requires_grad for p in model.parameters())
    assert all(p.grad is None for p in model.parameters())


class _Kill(Exception):
    pass


@pytest.mark.parametrize("forecast_order", [0, 2])
def test_checkpoint_resume_after_a_kill_gives_the_uninterrupted_router(tmp_path, forecast_order):
    """With forecasting, the fitted forecasts' sums are part of the state (the router learns on them)."""
    common = dict(
        num_steps=STEPS,
        iterations=4 * (STEPS - 1),
        batch_size=2,
        lambda_every=2 * (STEPS - 1),
        forecast_order=forecast_order,
        max_age=None,
        **(dict(target_cur=0.5, lr=1.0, lambda_variant="none") if forecast_order else dict(lr=0.1)),
    )
    straight = train_router(tiny_dit(), ddim(), progress=False, **common)

    def kill_after_two(record):
        if record["iteration"] >= 2 * (STEPS - 1):
            raise _Kill

    with pytest.raises(_Kill):
        train_router(
            tiny_dit(), ddim(), progress=False, checkpoint_dir=tmp_path, callback=kill_after_two, **common
        )
    resumed = train_router(tiny_dit(), ddim(), progress=False, checkpoint_dir=tmp_path, **common)
    assert resumed.resumed_from == 2 * (STEPS - 1)
    torch.testing.assert_close(resumed.router.logits, straight.router.logits)
    assert [h["iteration"] for h in resumed.history] == [h["iteration"] for h in straight.history]
    if forecast_order:
        torch.testing.assert_close(
            resumed.router.forecast.coefficients, straight.router.forecast.coefficients
        )

    other = dict(common, lr=0.2)
    with pytest.raises(ValueError, match="another training run.*lr"):
        train_router(tiny_dit(), ddim(), progress=False, checkpoint_dir=tmp_path, **other)
    (tmp_path / "router-training.pt").write_bytes(b"truncated")
    with pytest.raises(ValueError, match="not a readable training checkpoint"):
        train_router(tiny_dit(), ddim(), progress=False, checkpoint_dir=tmp_path, **common)


def test_the_trained_router_is_polished_by_exchanges_on_the_final_image():
    from harmonica.search import _EngineRunner, exchange_steps, final_error

    steps = 7
    common = dict(
        num_steps=steps,
        iterations=2 * (steps - 1),
        batch_size=2,
        target_cur=0.45,
        lambda_variant="none",
        progress=False,
    )
    plain = train_router(tiny_dit(), ddim(), exchanges=0, **common).router
    polished = train_router(tiny_dit(), ddim(), exchanges=2, **common).router
    model = tiny_dit()
    setup = _Setup(
        model,
        _RoutedHandle(model, steps, 0.1),
        ddim(),
        _ClassConditioning(model, None),
        True,
        1.5,
        torch.device("cpu"),
        _Group(),
    )
    runner = _EngineRunner(setup, steps, 0, 2, 2, fit=True)
    trained = plain.to_schedule().compute
    reference = runner.final(torch.ones_like(trained))
    # the polish starts from the best of the trained schedule and every static whole-step form of its
    # usage within the age cap, enumerated here from the definitions
    reused = int((~trained[:, 0]).sum())
    starts = {"trained": trained}
    for n in range(2, steps):
        fora = CacheSchedule.fora(steps, trained.shape[1], n, order=2)
        starts[f"FORA N={n}"] = fora.compute
    for w in (1, 3):
        starts[f"even steps after step {w - 1}"] = CacheSchedule.even_steps(
            steps, trained.shape[1], reused / steps, warmup=w
        ).compute
    errors = {
        name: final_error(runner.final(mask), reference)
        for name, mask in starts.items()
        if int((~mask[:, 0]).sum()) == reused and CacheSchedule(mask).max_age() <= 2
    }
    settings = polished.training_settings["polish_start"]
    assert set(settings["start_errors"]) <= set(errors) and "trained" in settings["start_errors"]
    for name, error in settings["start_errors"].items():
        assert error == pytest.approx(errors[name], abs=1e-9)
    assert settings["start"] == min(settings["start_errors"], key=settings["start_errors"].get)
    assert errors[settings["start"]] == pytest.approx(min(errors.values()), abs=1e-9)
    expected = exchange_steps(runner, starts[settings["start"]], reference, passes=2, max_age=2)
    assert torch.equal(polished.to_schedule().compute, expected)
    assert polished.to_schedule().cache_usage_ratio == plain.to_schedule().cache_usage_ratio
    assert torch.equal(polished.forecast.compute, expected)  # the fitted forecasts are the polished mask's
    assert len(polished.training_settings["polish"]) <= 2 and plain.training_settings["polish"] == []
    with pytest.raises(ValueError, match="exchanges polish an SDT router"):
        train_router(tiny_dit(), ddim(), num_steps=4, method="l2c", exchanges=1, progress=False)
    with pytest.raises(ValueError, match="exchanges is a number of exchange passes"):
        train_router(tiny_dit(), ddim(), num_steps=4, exchanges=-2, progress=False)


def test_l2c_pins_even_steps_and_trains_odd_ones():
    steps = 6
    data = torch.randn(10, 4, 8, 8).clamp(-1, 1)
    labels = torch.arange(10) % 5
    result = train_router(
        tiny_dit(),
        ddim(),
        num_steps=steps,
        method="l2c",
        iterations=30,
        batch_size=2,
        lr=1.0,
        beta=1.0,
        data=(data, labels),
        progress=False,
    )
    router = result.router
    assert router.pinned_steps == [0, 2, 4]
    schedule = router.to_schedule()
    assert schedule.compute[[0, 2, 4]].all()
    assert not schedule.compute[[1, 3, 5]].any()  # β = 1 at lr 1: the trained rows cache everything
    assert schedule.cache_usage_ratio == pytest.approx(0.5)
    assert router.training_settings["lambda_variant"] == "none"


def test_l2c_bad_input():
    with pytest.raises(ValueError, match="pass data="):
        train_router(tiny_dit(), ddim(), num_steps=4, method="l2c", iterations=1, progress=False)
    with pytest.raises(ValueError, match=r"samples are \(3, 8, 8\) but the model takes \(4, 8, 8\)"):
        train_router(
            tiny_dit(),
            ddim(),
            num_steps=4,
            method="l2c",
            iterations=1,
            data=torch.zeros(4, 3, 8, 8),
            progress=False,
        )
    from diffusers import EulerDiscreteScheduler

    with pytest.raises(ValueError, match="single-step sampler"):
        train_router(
            tiny_dit(),
            EulerDiscreteScheduler(),
            num_steps=4,
            method="l2c",
            iterations=1,
            data=torch.zeros(4, 4, 8, 8),
            progress=False,
        )
    with pytest.raises(ValueError, match="target_cur must be in"):
        train_router(
            tiny_dit(), ddim(), num_steps=4, method="l2c", target_cur=0.6, data=torch.zeros(4, 4, 8, 8)
        )


def test_bad_settings_are_named():
    model = tiny_dit()
    with pytest.raises(ValueError, match="method must be"):
        train_router(model, ddim(), num_steps=4, method="fora")
    with pytest.raises(ValueError, match="num_steps must be >= 2"):
        train_router(model, ddim(), num_steps=1)
    with pytest.raises(ValueError, match="pass the scheduler"):
        train_router(model, num_steps=4)
    with pytest.raises(ValueError, match="prompt_embeds"):
        train_router(tiny_pixart(), ddim(), num_steps=4)
    enable_cache(model, CacheSchedule.full(4, len(units(model))))
    with pytest.raises(RuntimeError, match="disable_cache"):
        train_router(model, ddim(), num_steps=4)
    disable_cache(model)


def test_pixart_trains_with_a_prompt_pool():
    model = tiny_pixart()
    gen = torch.Generator().manual_seed(0)
    result = train_router(
        model,
        ddim(),
        num_steps=4,
        iterations=9,
        batch_size=2,
        beta=1.0,
        lr=1.5,
        lambda_variant="none",
        prompt_embeds=torch.randn(3, TEXT_TOKENS, CAPTION_CHANNELS, generator=gen),
        progress=False,
        **PUBLISHED,
    )
    assert result.router.unit_names == units(model)
    assert any(name.endswith("attn2") for name in result.router.unit_names)
    assert result.router.to_schedule().cache_usage_ratio > 0.5


_TORCHRUN_SCRIPT = """
import sys, torch
sys.path.insert(0, {tests!r})
from harmonica.training import train_router
from tiny_models import ddim, tiny_dit
result = train_router(tiny_dit(), ddim(), num_steps=4, iterations=6, batch_size=4, lr=0.1,
                      lambda_every=3, lambda_batch_size=2, progress=False)
import torch.distributed as dist
if not dist.is_initialized() or dist.get_rank() == 0:
    result.router.save({out!r})
"""


@pytest.mark.skipif(sys.platform != "linux", reason="torchrun with gloo is exercised on Linux")
def test_torchrun_two_processes_give_the_one_process_router(tmp_path):
    tests = str(Path(__file__).parent)
    routers = {}
    for procs in (1, 2):
        out = tmp_path / f"router{procs}.safetensors"
        script = tmp_path / f"train{procs}.py"
        script.write_text(_TORCHRUN_SCRIPT.format(tests=tests, out=str(out)))
        env = dict(os.environ, OMP_NUM_THREADS="1")
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(procs), str(script)]
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        routers[procs] = Router.load(out)
    torch.testing.assert_close(routers[2].logits, routers[1].logits, rtol=1e-4, atol=1e-4)
    assert routers[2].training_settings["world_size"] == 2
    assert routers[2].training_settings["lambda_final"] == pytest.approx(
        routers[1].training_settings["lambda_final"], rel=1e-3, abs=1e-9
    )


def test_cli_train_writes_a_router_that_loads(tmp_path, capsys):
    from harmonica.cli import main
    from harmonica.reference import load_model

    out = tmp_path / "r.safetensors"
    code = main(
        [
            "train",
            "--steps",
            "4",
            "--iterations",
            "3",
            "--batch",
            "2",
            "--lambda-every",
            "100",
            "--lambda-batch",
            "1",
            "--exchanges",
            "1",
            "--threads",
            "1",
            "--out",
            str(out),
        ]
    )
    assert code == 0
    assert "cache usage ratio" in capsys.readouterr().out
    router = Router.load(out, model=load_model())
    assert router.num_steps == 4 and router.training_settings["iterations"] == 3
    assert router.training_settings["exchanges"] == 1
    with pytest.raises(SystemExit) as exc:
        main(["train", "--steps", "1", "--out", str(out)])
    assert exc.value.code == 2


def test_evidence_pipeline_on_a_reduced_setting(tmp_path):
    """The committed evidence run (train_routers, then compare) end to end at T=6, a few iterations:
    every method trains at the budget, saves, loads onto the reference model and is measured."""
    from harmonica.compare import compare
    from harmonica.reference import load_model, load_scheduler
    from harmonica.reference.train_routers import RUNS, main

    main(
        ["--out", str(tmp_path), "--steps", "6", "--iterations", "10", "--batch", "2", "--lambda-every", "5"]
        + ["--threads", "1"]
    )
    paths = {name: tmp_path / f"{name}-T6.safetensors" for name in RUNS}
    model = load_model()
    for name, path in paths.items():
        router = Router.load(path, model=model)
        assert router.training_settings["target_cur"] == 0.4 and router.training_settings["iterations"] == 10
        assert (tmp_path / f"{name}-T6.history.json").is_file()
    assert Router.load(paths["l2c"]).pinned_steps == [0, 2, 4]
    assert Router.load(paths["sdt"]).training_settings["lambda_variant"] == "none"
    assert Router.load(paths["harmonica-forecast"]).training_settings["exchanges"] == 3
    assert Router.load(paths["harmonica-steps"]).training_settings["exchanges"] == 0
    report = compare(
        model,
        scheduler=load_scheduler(),
        methods={"fora": ["2"]},
        routers=paths,
        num_inference_steps=6,
        n_per_class=2,
        batch_size=4,
        timing_repeats=1,
        out_dir=tmp_path / "compare",
        progress=False,
        verbose=False,
    )
    rows = {r.method: r for r in report.rows}
    for name in RUNS:
        row = rows[name]
        # measured where something was skipped (10 iterations may not reach the budget yet)
        assert row.skipped_share is not None
        assert row.skipped_share == 0 or row.measured_speedup is not None


# --------------------------------------------------------------------------------------------------
# The faithful method's mechanics, checked from their definitions


def _config(**overrides):
    from harmonica.training import TrainingConfig

    return TrainingConfig(
        num_steps=STEPS, **{"batch_size": 2, "beta": 0.0, **PUBLISHED, **overrides}
    ).resolved()


def test_an_iteration_at_step_t_moves_only_row_t_as_adamw_on_that_row_alone(dit):
    """One optimizer state per step: the other rows, their moments and step counts stay bit-identical,
    and row t follows torch's AdamW applied to that row as its own parameter."""
    from harmonica.training import RowAdamW, _State, _train_step

    setup = _setup(dit)
    router = Router.for_model(dit, STEPS, seed=3)
    config = _config(lr=0.1)
    optimizer = RowAdamW(router.logits, lr=config.lr)
    reference_row = torch.nn.Parameter(router.logits[2].detach().clone())
    reference = torch.optim.AdamW([reference_row], lr=config.lr, weight_decay=0.0)
    state = _State(beta=0.0, lam=torch.ones(STEPS))
    x = torch.randn(2, 4, 8, 8)
    labels = torch.tensor([1, 2])
    setup.handle.reset()
    setup.handle.set_mode("fill")
    with torch.no_grad():
        _call(setup, x, labels, 0, torch.tensor(900))
    for _ in range(2):  # a second step exercises the bias correction and the kept moments
        before = router.logits.detach().clone()
        moments = optimizer.exp_avg.clone(), optimizer.exp_avg_sq.clone()
        _train_step(setup, router, optimizer, config, state, x, torch.tensor(700), labels, 2, 1.0)
        others = [t for t in range(STEPS) if t != 2]
        assert torch.equal(router.logits.detach()[others], before[others])
        assert torch.equal(optimizer.exp_avg[others], moments[0][others])
        assert torch.equal(optimizer.exp_avg_sq[others], moments[1][others])
        assert [optimizer.steps[t] for t in others] == [0] * len(others)
        grad = optimizer.exp_avg[2] - 0.9 * moments[0][2]  # (1 − β1) · g
        reference_row.grad = grad / 0.1
        reference.step()
        torch.testing.assert_close(router.logits.detach()[2], reference_row.detach())


def test_the_loss_compares_guided_predictions_and_x_advances_with_the_students(dit):
    """With a frozen router (lr ≈ 0) a training trajectory is the soft sampling run: the student's
    guided prediction advances x; the fidelity term is MSE between guided student and teacher."""
    from harmonica import training
    from harmonica.training import RowAdamW, _State, _train_step

    setup = _setup(dit)
    router = Router.for_model(dit, STEPS, seed=4)
    config = _config(lr=1e-30, lambda_variant="none")
    optimizer = RowAdamW(router.logits, lr=config.lr)
    state = _State(beta=0.0, lam=torch.ones(STEPS))
    x, cond = training._draw(setup, training._generator(config.seed, 1, 0), config.batch_size)
    seen = []
    original = training._advance

    def recording(setup_, pred, t, x_):
        out = original(setup_, pred, t, x_)
        seen.append(out)
        return out

    training._advance = recording
    try:
        training._sdt_trajectory(setup, router, optimizer, config, state, None)
    finally:
        training._advance = original
    expected = []
    probabilities = router.probabilities().detach()
    _sample(setup, x, cond, probabilities, lambda i: True, on_step=lambda i, s: expected.append(s))
    for i in range(1, STEPS):
        torch.testing.assert_close(seen[i - 1], expected[i], rtol=1e-5, atol=1e-6)
    assert optimizer.steps[0] == 0 and state.iteration == STEPS - 1  # step 0 is never trained

    # the loss of one step, against guided predictions computed independently
    setup.handle.reset()
    setup.handle.set_mode("fill")
    with torch.no_grad():
        _call(setup, x, cond, 0, torch.tensor(900))
        setup.handle.set_mode("teacher")
        teacher = _call(setup, x, cond, 1, torch.tensor(700))
    t = torch.tensor(700)
    student, loss, _ = _train_step(setup, router, optimizer, config, state, x, t, cond, 1, 2.0)
    guide = lambda p: p.chunk(2)[1] + 1.5 * (p.chunk(2)[0] - p.chunk(2)[1])  # noqa: E731
    expected_loss = 2.0 * torch.nn.functional.mse_loss(guide(student), guide(teacher)).item()
    assert loss == pytest.approx(expected_loss, rel=1e-5)


def test_straight_through_runs_the_hard_schedule_and_still_has_a_gradient(dit):
    from harmonica.training import RowAdamW, _State, _train_step

    setup = _setup(dit, guidance=1.0)
    router = Router.for_model(dit, STEPS, seed=5)
    config = _config(straight_through=True, lr=0.1)
    optimizer = RowAdamW(router.logits, lr=config.lr)
    state = _State(beta=0.0, lam=torch.ones(STEPS))
    x = torch.randn(2, 4, 8, 8)
    labels = torch.tensor([3, 4])
    setup.handle.reset()
    setup.handle.set_mode("fill")
    with torch.no_grad():
        _call(setup, x, labels, 0, torch.tensor(900))
    hard = (router.probabilities()[1] > 0.1).float().detach()
    before = setup.handle.snapshot()
    t = torch.tensor(700)
    student, _, written = _train_step(setup, router, optimizer, config, state, x, t, labels, 1, 1.0)
    assert torch.equal(written, hard.bool())
    setup.handle.restore(before)
    setup.handle.set_soft(hard, defer_writes=True)
    with torch.no_grad():
        expected = _call(setup, x, labels, 1, torch.tensor(700))
    setup.handle.pending = {}
    torch.testing.assert_close(student, expected)
    assert optimizer.exp_avg[1].abs().sum() > 0


def test_max_age_caps_the_age_of_reused_entries():
    compute = torch.ones(7, 2, dtype=torch.bool)
    compute[1:, 0] = False  # unit 0 reused for six steps after step 0
    compute[2, 1] = compute[3, 1] = False
    schedule = CacheSchedule.from_mask(compute)
    assert schedule.max_age() == 6
    capped = schedule.with_max_age(2)
    assert capped.max_age() == 2
    assert capped.compute[:, 0].tolist() == [True, False, False, True, False, False, True]
    assert capped.compute[:, 1].tolist() == compute[:, 1].tolist()
    assert schedule.with_max_age(None) is schedule
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="max_age"):
            schedule.with_max_age(bad)


def test_training_with_an_age_cap_gives_a_router_within_it():
    result = train_router(
        tiny_dit(num_layers=1),
        ddim(),
        num_steps=6,
        iterations=10,
        batch_size=1,
        lr=0.5,
        target_cur=0.5,
        max_age=1,
        lambda_variant="none",
        progress=False,
    )
    schedule = result.router.to_schedule()
    assert schedule.max_age() <= 1 and result.router.max_age == 1


def test_without_beta_or_target_training_runs_in_budget_mode_and_says_so(capsys):
    from harmonica.training import DEFAULT_TARGET_CUR

    result = train_router(tiny_dit(num_layers=1), ddim(), num_steps=STEPS, iterations=8, batch_size=1, lr=0.5)
    settings = result.router.training_settings
    assert settings["target_cur"] == DEFAULT_TARGET_CUR and settings["beta"] is None
    assert f"budget mode at a cache usage ratio of {DEFAULT_TARGET_CUR}" in capsys.readouterr().err
    assert abs(result.router.to_schedule().cache_usage_ratio - DEFAULT_TARGET_CUR) <= 0.05


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(target_cur=1.2), r"target_cur must be in \(0, 1.0\).*got 1.2"),
        (dict(target_cur=0.0), r"target_cur must be in \(0, 1.0\).*got 0.0"),
        (dict(max_age=0), "max_age .* got 0"),
        (dict(lambda_on="exact"), "lambda_on must be 'soft' or 'hard', got 'exact'"),
    ],
)
def test_new_settings_are_checked(kwargs, match):
    with pytest.raises(ValueError, match=match):
        train_router(tiny_dit(num_layers=1), ddim(), num_steps=STEPS, iterations=1, progress=False, **kwargs)


def test_budget_control_brackets_beta_instead_of_swinging_past_it():
    """On a monotone usage(β) the control doubles β until usage crosses the target, then halves its step
    at each crossing: it ends within a point of the target and never again goes as far past it as at
    the first crossing."""
    import math

    from harmonica.training import _State, _steer_beta

    def usage(beta: float) -> float:  # cache usage as a smooth increasing function of log β
        return 1 / (1 + math.exp(-(math.log(beta) - math.log(3e-6))))

    target = 0.4
    state = _State(beta=1e-9, lam=torch.ones(3))
    errors = []
    for _ in range(60):
        errors.append(target - usage(state.beta))
        _steer_beta(state, errors[-1])
    first_cross = next(i for i, e in enumerate(errors) if e < 0)
    assert all(abs(e) <= abs(errors[first_cross]) + 1e-9 for e in errors[first_cross:])
    assert abs(usage(state.beta) - target) < 0.011


# --------------------------------------------------------------------------------------------------
# Training with the forecast as the cached path (forecast_order)


@pytest.mark.parametrize("order", [1, 2])
def test_forecast_path_runs_what_the_engine_runs_on_the_same_hard_schedule(order):
    """A hard schedule through the training handle with ``forecast_order`` k ends on the sample of the
    inference engine running ``schedule.with_forecast(k)`` (whose forecasts are oracle-tested), with
    unequal step distances and units whose history is too short for order k."""
    from harmonica.sampling import sample

    model = tiny_dit(num_layers=2)
    steps = 8
    compute = torch.ones(steps, len(units(model)), dtype=torch.bool)
    compute[[1, 4, 6, 7], 0] = False  # unit 0: reuse (one write), then forecasts at distances 1 and 2
    compute[[2, 3, 5, 7], 1] = False
    compute[[3, 6], 2:] = False
    setup = _setup(model, guidance=1.0, steps=steps, forecast_order=order)
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    labels = torch.tensor([5, 9])
    trained = _sample(setup, noise.clone(), labels, compute.float(), lambda i: True)
    disable_cache(model)
    schedule = CacheSchedule.from_mask(compute).with_forecast(order)
    assert schedule.forecasts
    enable_cache(model, schedule)
    common = dict(num_inference_steps=steps, guidance_scale=1.0, noise=noise, clamp=False)
    engine = sample(model, ddim(), labels, **common)
    disable_cache(model)
    reuse = sample(model, ddim(), labels, **common)
    torch.testing.assert_close(trained, engine, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(trained, reuse, rtol=1e-4, atol=1e-5)  # cached units do matter here


def test_forecast_path_gradient_matches_finite_differences():
    """With a forecast as the cached path, d loss / d logits still matches central differences."""
    model = tiny_dit(num_layers=2)
    setup = _setup(model, guidance=1.0, forecast_order=2)
    handle = setup.handle
    gen = torch.Generator().manual_seed(2)
    xs = torch.randn(4, 2, 4, 8, 8, generator=gen)
    labels = torch.tensor([1, 2])
    handle.reset()
    handle.set_mode("fill")
    with torch.no_grad():
        for step, t in enumerate((900, 800, 700)):
            _call(setup, xs[step], labels, step, torch.tensor(t))
        handle.set_mode("teacher")
        teacher = _call(setup, xs[3], labels, 3, torch.tensor(600))
        handle.set_soft(torch.zeros(len(units(model))), defer_writes=True)
        forecast = _call(setup, xs[3], labels, 3, torch.tensor(600))
    assert not torch.allclose(forecast, teacher)
    _check_logit_gradient(setup, xs[3], labels, 3, torch.tensor(600), teacher, gen)
    disable_cache(model)


@pytest.mark.parametrize("fit", [True, False])
def test_training_with_forecasts_gives_a_router_that_forecasts(tmp_path, fit):
    model = tiny_dit(num_layers=1)
    result = train_router(
        model,
        ddim(),
        num_steps=8,
        iterations=14,
        batch_size=2,
        lr=0.5,
        target_cur=0.5,
        max_age=None,
        forecast_order=2,
        fit_coefficients=fit,
        lambda_variant="none",
        progress=False,
    )
    router = result.router
    hard = CacheSchedule(router.to_schedule().compute)
    forecast = router.forecast
    assert forecast is not None and forecast.forecasts
    assert torch.equal(forecast.compute, hard.compute) and router.to_schedule() is forecast
    rule = hard.with_forecast(2)
    assert torch.equal(forecast.orders, rule.orders)
    assert torch.equal(forecast.coefficients, rule.coefficients) != fit
    assert result.router.training_settings["forecast_order"] == 2
    path = tmp_path / "router.safetensors"
    router.save(path)
    loaded = Router.load(path, model=model)
    assert torch.equal(loaded.forecast.coefficients, forecast.coefficients)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(forecast_order=3), "order is the forecast order.*got 3"),
        (dict(forecast_order=2, method="l2c"), "forecast_order needs the step-wise trajectories"),
    ],
)
def test_forecast_settings_are_checked(kwargs, match):
    with pytest.raises(ValueError, match=match):
        train_router(tiny_dit(num_layers=1), ddim(), num_steps=STEPS, iterations=1, progress=False, **kwargs)


def test_forecasts_fitted_on_the_training_calls_solve_their_ridge_least_squares():
    """With ``collect``, a key's coefficients after two trajectories are the ridge solution of all the
    calls gathered under it (an augmented lstsq, from the recorded branch outputs and histories), and
    they forecast those calls no worse than the step-distance rule."""
    from harmonica.forecast import DEFAULT_RIDGE
    from harmonica.schedule import rule_coefficients

    model = tiny_dit(num_layers=1)
    setup = _setup(model, guidance=1.0, forecast_order=2)
    handle = setup.handle
    handle.collect = True
    recorded: dict = {}
    gather = handle._gather

    def record(key, y, c0, terms):
        recorded.setdefault(key, []).append((y.detach().double(), c0.double(), [t.double() for t in terms]))
        gather(key, y, c0, terms)

    handle._gather = record
    labels = torch.tensor([2, 6])
    for seed in (0, 1):
        x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(seed))
        handle.reset()
        handle.set_mode("fill")
        with torch.no_grad():
            for step, t in enumerate((900, 800, 700)):
                x = x + 0.1 * _call(setup, x, labels, step, torch.tensor(t))[:, :4]
        r = torch.zeros(len(units(model)), requires_grad=True)
        handle.set_soft(r + 0.0, defer_writes=True)  # a hard reuse with a gradient: the student's call
        _call(setup, x, labels, 3, torch.tensor(600))
        handle.pending = {}
        handle.merge_statistics(_Group())
    assert len(handle.statistics) == len(units(model))
    for key, calls in recorded.items():
        assert key[0] == 3 and key[2] == (2, 1, 0) and len(calls) == 2
        X = torch.cat([torch.stack([t.flatten() for t in terms], 1) for _, _, terms in calls])
        target = torch.cat([(y - c0).flatten() for y, c0, _ in calls])
        prior = torch.tensor(rule_coefficients(3, [2, 1, 0]), dtype=torch.float64)
        mu = DEFAULT_RIDGE * (X.T @ X).diagonal().mean()
        augmented = torch.cat([X, mu.sqrt() * torch.eye(2, dtype=X.dtype)])
        expected = torch.linalg.lstsq(augmented, torch.cat([target, mu.sqrt() * prior])[:, None]).solution[
            :, 0
        ]
        fitted = torch.stack([torch.as_tensor(c).double() for c in handle._fitted_coefficients(key)])
        torch.testing.assert_close(fitted, expected, rtol=1e-4, atol=1e-6)
        assert (target - X @ fitted).square().sum() <= (target - X @ prior).square().sum()


@pytest.mark.parametrize(
    "gradient_at, logit, forecast_order", [("reuse", 3.0, 0), ("reuse", -3.0, 2), ("hard", -3.0, 2)]
)
def test_branches_blended_at_zero_run_without_autograd_and_give_the_same_step(
    monkeypatch, gradient_at, logit, forecast_order
):
    """A row blended at 0 in value (the gradient at reuse, or a reused straight-through row): its
    branches keep no activations for the backward, and the step (gradient, optimizer state, student,
    cache) is bit-identical to the one whose branches kept their graph (whose gradient is a sum of
    exact zeros)."""
    from harmonica.training import RowAdamW, _State, _train_step

    model = tiny_dit(num_layers=3, attention_head_dim=10)
    x = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(6))
    labels = torch.tensor([1, 8, 4])
    set_soft = _RoutedHandle.set_soft
    runs = {}
    for keep_graph in (False, True):
        if keep_graph:

            def with_graph(self, *args, **kwargs):
                set_soft(self, *args, **kwargs)
                self.branches_without_graph = False

            monkeypatch.setattr(_RoutedHandle, "set_soft", with_graph)
        setup = _setup(model, forecast_order=forecast_order)
        router = Router.for_model(model, STEPS, seed=5)
        with torch.no_grad():
            router.logits.fill_(logit)
        config = _config(
            straight_through=True, lr=0.1, gradient_at=gradient_at, forecast_order=forecast_order
        )
        optimizer = RowAdamW(router.logits, lr=config.lr)
        setup.handle.reset()
        with torch.no_grad():
            for step, t in enumerate((900, 800, 700)):
                setup.handle.set_mode("fill")
                x_t = x + 0.1 * step
                _call(setup, x_t, labels, step, torch.tensor(t))
        state = _State(beta=0.0, lam=torch.ones(STEPS))
        saved = []

        def pack(tensor, saved=saved):
            saved.append(tensor.numel() * tensor.element_size())
            return tensor

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            student, _, _ = _train_step(
                setup, router, optimizer, config, state, x, torch.tensor(600), labels, 3, 1.0
            )
        runs[keep_graph] = (sum(saved), optimizer.exp_avg[3].clone(), student, setup.handle.snapshot()[0])
        disable_cache(model)
    (lean, *step), (full, *expected) = runs[False], runs[True]
    assert lean < full / 2, (lean, full)
    assert step[0].abs().min() > 0
    for a, b in zip(step, expected, strict=True):
        for u, v in zip(a, b, strict=True) if isinstance(a, list) else [(a, b)]:
            assert torch.equal(u, v)


@pytest.mark.parametrize("forecast_order", [0, 2])
def test_gradient_at_reuse_gives_a_computed_row_the_cost_of_caching_it(forecast_order):
    """A row the hard schedule computes: with ``gradient_at="hard"`` its student is the teacher and the
    fidelity gradient is 0; with ``"reuse"`` the gradient is that of the row reused (r → 0 through the
    blend, pulling r up), while x still advances with, and the cache is written by, the computed row."""
    from harmonica.training import RowAdamW, _State, _train_step

    model = tiny_dit(num_layers=2)
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(4))
    labels = torch.tensor([1, 8])
    grads, outputs = {}, {}
    for mode in ("hard", "reuse"):
        setup = _setup(model, guidance=1.0, forecast_order=forecast_order)
        router = Router.for_model(model, STEPS, seed=5)
        with torch.no_grad():
            router.logits.fill_(3.0)  # every unit computed
        config = _config(straight_through=True, lr=0.1, gradient_at=mode)
        optimizer = RowAdamW(router.logits, lr=config.lr)
        setup.handle.reset()
        setup.handle.set_mode("fill")
        with torch.no_grad():
            _call(setup, x, labels, 0, torch.tensor(900))
        state = _State(beta=0.0, lam=torch.ones(STEPS))
        student, _, written = _train_step(
            setup, router, optimizer, config, state, x, torch.tensor(700), labels, 1, 1.0
        )
        assert bool(written.all())
        grads[mode] = optimizer.exp_avg[1].clone()
        outputs[mode] = (student, setup.handle.snapshot()[0])
        disable_cache(model)
    assert (grads["reuse"] < 0).all()  # reusing costs fidelity: r is pulled up
    assert grads["hard"].abs().max() < 1e-4 * grads["reuse"].abs().min()  # rounding only
    torch.testing.assert_close(outputs["reuse"][0], outputs["hard"][0])
    for a, b in zip(outputs["reuse"][1], outputs["hard"][1], strict=True):
        torch.testing.assert_close(a, b)
