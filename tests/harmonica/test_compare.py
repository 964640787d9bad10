"""`harmonica compare` on tiny models: every peer really skips, no-ops are named, files parse, bad input."""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys

import pytest
import torch

from harmonica import CacheSchedule, Router, disable_cache, enable_cache, units
from harmonica.compare import compare, method_from_spec
from harmonica.peers import (
    Attachment,
    DBCache,
    Fora,
    Method,
    PyramidAttentionBroadcast,
    TaylorSeer,
    UnitCounter,
    cache_dit_available,
)
from harmonica.sampling import sample

from .tiny_models import CAPTION_CHANNELS, TEXT_TOKENS, ddim, dit_pipeline, tiny_dit, tiny_pixart

STEPS = 6
FAST = dict(
    num_inference_steps=STEPS, num_samples=2, batch_size=2, timing_repeats=1, progress=False, verbose=False
)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def dit():
    return tiny_dit(num_layers=4)


def _state(model):
    """Everything a method could leave behind: attributes, submodules and hooks of every module."""
    return [
        (name, sorted(m.__dict__), sorted(m._modules), len(m._forward_hooks), len(m._forward_pre_hooks))
        for name, m in model.named_modules()
    ] + [type(model)]


class _Leaky(Method):
    """A broken peer: its detach leaves an output-changing hook behind."""

    family = "leaky"
    origin = "peer"

    def attach(self, transformer, run):
        transformer.proj_out_2.register_forward_hook(lambda m, a, out: out + 1e-3)

        class _Attached(Attachment):
            def generation(self):
                return contextlib.nullcontext()

            def detach(self):
                pass

        return _Attached()


def test_a_method_that_does_not_restore_the_model_invalidates_the_run():
    with pytest.raises(RuntimeError, match="did not restore the model"):
        compare(tiny_dit(num_layers=2), scheduler=ddim(), methods=[_Leaky("leaky")], **FAST)


def test_unit_counter_sees_the_engine_skip(dit):
    schedule = CacheSchedule.fora(STEPS, len(units(dit)), 3)
    noise, labels = torch.randn(2, 4, 8, 8), torch.tensor([1, 2])
    with torch.inference_mode(), UnitCounter(dit) as counter:
        sample(dit, ddim(), labels, num_inference_steps=STEPS, noise=noise, clamp=False)
    assert counter.executed.shape == (STEPS, len(units(dit))) and bool(counter.executed.all())
    enable_cache(dit, schedule)
    try:
        with torch.inference_mode(), UnitCounter(dit) as counter:
            sample(dit, ddim(), labels, num_inference_steps=STEPS, noise=noise, clamp=False)
    finally:
        disable_cache(dit)
    assert torch.equal(counter.executed, schedule.compute)


def test_each_peer_really_skips(dit):
    methods = [
        method_from_spec("fbcache", "10"),  # any residual change is "small": skip every step it may
        method_from_spec("taylorseer", "2"),
        method_from_spec("magcache", "10"),
        method_from_spec("magcache", "100"),  # past the max_skip_steps cap: the same steps skipped
        method_from_spec("pab", "2"),
    ]
    if cache_dit_available():
        methods.append(DBCache("DBCache", threshold=10.0, max_warmup_steps=2))
    before = _state(dit)
    report = compare(dit, scheduler=ddim(), methods=methods, **FAST)
    assert _state(dit) == before, "a peer left attributes, submodules or hooks behind"
    for method in methods:
        row = report.row(method.label)
        assert row.status == "ok", (method.label, row.status)
        assert 0 < row.skipped_share < 1, method.label
        assert row.psnr is not None and row.mse > 0, f"{method.label} skipped compute but changed nothing"
        assert row.ideal_speedup > 1 and row.measured_speedup > 0
    assert report.row("MagCache τ=100").note == "same units ran as MagCache τ=10"
    assert report.row("MagCache τ=10").note == ""
    # PAB broadcasts self-attention only: feed-forward always runs
    pab = torch.tensor(report.row("PAB N=2").executed)
    assert bool((pab[:, 1::2] == 1).all()) and bool((pab[:, 0::2] < 1).any())
    # MagCache skips whole steps and stops at max_skip_steps=3 consecutive ones
    mag = torch.tensor(report.row("MagCache τ=10").executed)
    skipped_steps = (mag == 0).all(dim=1).tolist()
    assert any(skipped_steps) and "True, True, True, True" not in str(skipped_steps)


def test_noop_configurations_are_reported_as_skipped_nothing(dit):
    methods = [
        TaylorSeer("TaylorSeer default patterns", cache_identifiers=None),  # matches no DiT module
        method_from_spec("fbcache", "1e-9"),  # the residual always changes more than this
        PyramidAttentionBroadcast("PAB outside its window", skip_range=2, timestep_range=(2000, 3000)),
    ]
    if cache_dit_available():
        methods.append(DBCache("DBCache in warm-up", threshold=10.0))  # cache-dit's 8 warm-up steps > 6
    report = compare(dit, scheduler=ddim(), methods=methods, **FAST)
    for method in methods:
        row = report.row(method.label)
        assert row.status == "skipped nothing" and row.skipped_share == 0, method.label
        assert row.psnr is None and row.mse == 0, "no skipping must mean identical samples"
    assert "skipped nothing" in report.table()


@pytest.mark.parametrize("make", [tiny_dit, tiny_pixart], ids=["dit", "pixart"])
def test_fora_skip_share_is_its_cache_usage_ratio(make):
    model = make(num_layers=3)
    kwargs = dict(FAST)
    if make is tiny_pixart:
        g = torch.Generator().manual_seed(0)
        kwargs["prompt_embeds"] = {
            "prompt_embeds": torch.randn(2, TEXT_TOKENS, CAPTION_CHANNELS, generator=g)
        }
    report = compare(model, scheduler=ddim(), methods={"fora": [2, 3, 4]}, **kwargs)
    for n in (2, 3, 4):
        row = report.row(f"FORA N={n}")
        schedule = CacheSchedule.fora(STEPS, len(units(model)), n)
        assert row.status == "ok"
        exact = int((~schedule.compute).sum()) / schedule.compute.numel()
        assert row.skipped_share == pytest.approx(exact, rel=1e-12)
        assert row.cache_usage_ratio == pytest.approx(exact, abs=1e-6)  # CUR is a float32 mean
        assert torch.equal(torch.tensor(row.executed).bool(), schedule.compute)
        assert row.ideal_speedup == pytest.approx(schedule.ideal_speedup(model))


def test_router_files(dit, tmp_path):
    router = Router.for_model(dit, STEPS, scheduler=ddim())
    with torch.no_grad():
        router.logits[1:] = -5.0
        router.logits[1:, :2] = 5.0  # block 0 always computed, the rest reused after step 0
        router.logits[3] = 5.0
    path = tmp_path / "r.safetensors"
    router.save(path)
    report = compare(dit, scheduler=ddim(), methods=[], routers={"mine": path}, **FAST)
    row = report.row("mine")
    assert row.family == "router" and row.origin == "ours" and row.status == "ok"
    assert row.skipped_share == pytest.approx(router.to_schedule(0.1).cache_usage_ratio)

    other_steps = Router.for_model(dit, STEPS + 1)
    other_steps.save(tmp_path / "long.safetensors")
    with pytest.raises(ValueError, match=f"trained for {STEPS + 1} sampling steps.*num_inference_steps"):
        compare(dit, scheduler=ddim(), methods=[], routers=[tmp_path / "long.safetensors"], **FAST)
    with pytest.raises(FileNotFoundError):
        compare(dit, scheduler=ddim(), methods=[], routers={"gone": tmp_path / "missing.safetensors"}, **FAST)


def test_report_files_parse(tmp_path):
    pipe = dit_pipeline(tiny_dit(num_layers=2))
    folder = tmp_path / "pipe"
    pipe.save_pretrained(folder)
    out = tmp_path / "report"
    report = compare(folder, methods={"fora": [2], "pab": [2]}, out_dir=out, **FAST)
    names = {p.name for p in out.iterdir()}
    assert names == {"report.md", "report.json", "pareto.png", "executed.png"}, "missing or temporary files"
    payload = json.loads((out / "report.json").read_text())
    assert [r["method"] for r in payload["rows"]] == ["uncached", "FORA N=2", "PAB N=2"]
    assert payload["context"]["output_space"] == "pixels"  # the pipeline's VAE decoded the latents
    assert payload["context"]["num_inference_steps"] == STEPS
    for png in ("pareto.png", "executed.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    markdown = (out / "report.md").read_text()
    assert "| FORA N=2 | FORA |" in markdown and "At matched speedup" in markdown
    assert report.row("FORA N=2").ssim is not None  # decoded 16×16 images are large enough for SSIM


def test_transformer_folder_and_cli(tmp_path):
    folder = tmp_path / "dit"
    tiny_dit(num_layers=2).save_pretrained(folder)
    ddim().save_pretrained(folder)
    out = tmp_path / "cli"
    args = ["compare", "--model", str(folder), "--methods", "fora,pab", "--sweep", "fora=2,3"]
    args += ["--steps", "4", "--num-samples", "2", "--batch-size", "2", "--timing-repeats", "1"]
    args += ["--threads", "1", "--no-progress", "--out", str(out)]
    proc = subprocess.run(
        [sys.executable, "-m", "harmonica.cli", *args], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr
    assert "FORA N=3" in proc.stdout and "PAB N=2" in proc.stdout
    rows = json.loads((out / "report.json").read_text())["rows"]
    assert [r["method"] for r in rows] == ["uncached", "FORA N=2", "FORA N=3", "PAB N=2", "PAB N=3"]
    assert rows[1]["settings"] == {"interval": 2}


@pytest.mark.parametrize(
    ("methods", "match"),
    [
        ({"nope": [1]}, "unknown method family 'nope'"),
        ({"fora": ["x"]}, "fora: 'x' is not a valid int"),
        ({"fora": [0]}, "fora: '0' must be at least 1"),
        ({"pab": [1]}, "pab: '1' must be at least 2"),
        ({"magcache": ["0.1:0"]}, "magcache: '0' must be at least 1"),
        ({"fbcache": ["nan"]}, "fbcache: 'nan' must be at least"),
        ({}, "no methods to compare"),
        ([Fora("same"), Fora("same")], "labels must be unique"),
        (["fora"], "must be harmonica.peers.Method objects"),
    ],
)
def test_bad_methods(dit, methods, match):
    with pytest.raises(ValueError, match=match):
        compare(dit, scheduler=ddim(), methods=methods, **FAST)


def test_bad_inputs(dit, tmp_path):
    with pytest.raises(ValueError, match="batch_size must be an int >= 1"):
        compare(dit, scheduler=ddim(), methods={"fora": [2]}, **{**FAST, "batch_size": 0})
    with pytest.raises(ValueError, match="guidance_scale must be >= 1"):
        compare(dit, scheduler=ddim(), methods={"fora": [2]}, guidance_scale=0.5, **FAST)
    with pytest.raises(ValueError, match="needs its sampler: pass scheduler"):
        compare(dit, methods={"fora": [2]}, **FAST)
    with pytest.raises(FileNotFoundError, match="no model folder"):
        compare(tmp_path / "nowhere", methods={"fora": [2]}, **FAST)
    with pytest.raises(ValueError, match="has no config.json"):
        compare(tmp_path, methods={"fora": [2]}, **FAST)
    with pytest.raises(ValueError, match="text-conditioned: pass prompt_embeds"):
        compare(tiny_pixart(), scheduler=ddim(), methods={"fora": [2]}, **FAST)
    with pytest.raises(ValueError, match="class_labels must"):
        compare(dit, scheduler=ddim(), methods={"fora": [2]}, class_labels=[1000], **FAST)
    with pytest.raises(ValueError, match="not a single path"):
        compare(dit, scheduler=ddim(), methods=[], routers="r.safetensors", **FAST)


def test_cli_bad_input_exits_2():
    proc = subprocess.run(
        [sys.executable, "-m", "harmonica.cli", "compare", "--methods", "fora,teacache", "--out", "unused"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2 and "unknown family ['teacache']" in proc.stderr
    assert "lsnr" in proc.stderr  # the optional families are named too


def test_dbcache_without_cache_dit_is_reported_unavailable(dit, monkeypatch):
    monkeypatch.setattr("harmonica.peers.cache_dit_available", lambda: False)
    report = compare(dit, scheduler=ddim(), methods={"dbcache": [0.1], "fora": [2]}, **FAST)
    assert report.row("DBCache F1B0 τ=0.1").status.startswith("unavailable: cache-dit is not installed")
    assert report.row("DBCache F1B0 τ=0.1").skipped_share is None and report.row("FORA N=2").status == "ok"


@pytest.mark.parametrize("make", [tiny_dit, tiny_pixart], ids=["dit", "pixart"])
def test_fitted_forecast_fits_on_the_compared_model(make):
    model = make(num_layers=3)
    kwargs = dict(FAST)
    if make is tiny_pixart:
        g = torch.Generator().manual_seed(0)
        kwargs["prompt_embeds"] = {
            "prompt_embeds": torch.randn(2, TEXT_TOKENS, CAPTION_CHANNELS, generator=g)
        }
    report = compare(model, scheduler=ddim(), methods={"forecast": ["2"], "fitted": ["2"]}, **kwargs)
    rule, fitted = report.row("forecast N=2 order 2"), report.row("fitted forecast N=2 order 2")
    assert rule.status == fitted.status == "ok"
    assert fitted.skipped_share == rule.skipped_share and fitted.family == "fitted forecast"
    assert fitted.psnr != rule.psnr, "the fitted coefficients must change the samples"


def test_forecast_rows_measure_the_rule_where_they_say(dit):
    """``forecast`` blends the rule in step index and in the run's sampler's log-SNR; ``step`` and
    ``lsnr`` run each alone; all on the same schedule, with other samples."""
    from harmonica.peers import RunInfo
    from harmonica.schedule import log_snr_times

    report = compare(dit, scheduler=ddim(), methods={"forecast": ["2"], "step": ["2"], "lsnr": ["2"]}, **FAST)
    rows = [report.row(f"forecast N=2 order 2{tail}") for tail in ("", " step index", " log-SNR")]
    assert [r.family for r in rows] == ["forecast", "forecast (step index)", "forecast (log-SNR)"]
    assert all(r.status == "ok" and r.skipped_share == rows[0].skipped_share for r in rows)
    assert len({r.psnr for r in rows}) == 3, "each time must change the samples"
    steps, num_units = STEPS, len(units(dit))
    run = RunInfo(num_inference_steps=steps, calibrate=lambda: None, scheduler=ddim())
    expected = {
        "forecast": CacheSchedule.fora(steps, num_units, 3, order=1, scheduler=ddim()),
        "step": CacheSchedule.fora(steps, num_units, 3, order=1),
        "lsnr": CacheSchedule.fora(steps, num_units, 3, order=1, times=log_snr_times(ddim(), steps)),
    }
    for family, schedule in expected.items():
        method = method_from_spec(family, "3:1")
        method.prepare(dit, run)
        assert method.schedule(dit, steps) == schedule, family
    no_sampler = RunInfo(num_inference_steps=steps, calibrate=lambda: None)
    for family in ("forecast", "lsnr"):
        with pytest.raises(ValueError, match="needs the run's sampler"):
            method_from_spec(family, "2").prepare(dit, no_sampler)
    method_from_spec("step", "2").prepare(dit, no_sampler)  # the step index needs no sampler


@pytest.mark.parametrize("interval", [2, 3])
def test_step_rule_at_order_1_is_diffusers_taylorseer(dit, interval):
    """Our static form with the step-index rule at order 1 forecasts what diffusers' TaylorSeer does
    (same warm-up, schedule and first-order Taylor term): the same samples, through each one's hooks."""
    from harmonica.peers import RunInfo

    steps = 11
    shape = (2, dit.config.in_channels, dit.config.sample_size, dit.config.sample_size)
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(3))
    run = RunInfo(num_inference_steps=steps, calibrate=lambda: None, scheduler=ddim())
    out = {}
    for family, spec in (
        ("step", f"{interval}:1"),
        ("taylorseer", str(interval)),
        ("forecast", f"{interval}:1"),
    ):
        method = method_from_spec(family, spec)
        method.prepare(dit, run)
        attachment = method.attach(dit, run)
        with torch.no_grad(), attachment.generation():
            out[family] = sample(dit, ddim(), [1, 7], num_inference_steps=steps, noise=noise)
        attachment.detach()
    with torch.no_grad():
        uncached = sample(dit, ddim(), [1, 7], num_inference_steps=steps, noise=noise)
    torch.testing.assert_close(out["step"], out["taylorseer"], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(out["step"], uncached, rtol=1e-4, atol=1e-4), "nothing was forecast"
    assert not torch.allclose(out["forecast"], out["step"], rtol=1e-4, atol=1e-4), "the blend is another rule"


def test_router_labels_may_hold_an_equals_sign(tmp_path):
    from harmonica.cli import _label_and_path

    path = tmp_path / "r=1.safetensors"
    path.write_bytes(b"")
    assert _label_and_path(f"fitted N=2={path}") == ("fitted N=2", str(path))
    assert _label_and_path(str(path)) == ("r=1", str(path))
    assert _label_and_path(f"plain={path}") == ("plain", str(path))
    assert _label_and_path("a=missing.safetensors") == ("a", "missing.safetensors")


def test_report_says_when_its_timing_was_unsteady():
    from harmonica.compare import CompareReport, MethodRow

    def row(method, low, median, high):
        return MethodRow(method, "FORA", "ours", measured_speedup=median, speedup_min=low, speedup_max=high)

    baseline = MethodRow(
        "uncached", "baseline", "baseline", measured_speedup=1.0, speedup_min=0.5, speedup_max=2
    )
    steady = [baseline, row("FORA N=2", 1.9, 2.0, 2.1), row("FORA N=3", 2.4, 2.5, 2.7)]
    assert not any("unsteady" in note for note in CompareReport(steady, {})._notes())
    shaky = [*steady, row("FORA N=4", 2.5, 3.0, 3.6)]
    notes = [note for note in CompareReport(shaky, {})._notes() if "unsteady" in note]
    assert len(notes) == 1
    assert "1 of 3 methods" in notes[0] and "FORA N=4 (2.50–3.60×, 37%)" in notes[0]
