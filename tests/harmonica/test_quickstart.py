"""`harmonica quickstart` end to end on a reduced setting, and the CLI entry point."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from harmonica.quickstart import run_quickstart


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("report")
    results = run_quickstart(
        out,
        n_per_class=2,
        num_inference_steps=4,
        timing_batch=2,
        timing_repeats=1,
        peers=False,
        train_iterations=8,
        progress=False,
    )
    return out, results


def test_report_files(report):
    out, results = report
    names = {p.name for p in out.iterdir()}
    assert {"report.md", "report.json", "schedules.png", "speed_quality.png"} <= names
    assert {"grid_uncached.png", "grid_full.png", "grid_fora_n_2.png", "grid_fora_n_3.png"} <= names
    assert not [n for n in names if n.startswith(".")], "temporary files left behind"
    payload = json.loads((out / "report.json").read_text())
    assert [r["method"] for r in payload["results"]] == [r.method for r in results]
    assert "| FORA N=2 |" in (out / "report.md").read_text()


def test_the_quickstart_trains_a_router_and_compares_it(report):
    out, results = report
    assert (out / "trained-here-T4.safetensors").is_file()
    row = next(r for r in results if r.method == "router trained-here-T4")
    assert 0 <= row.cache_usage_ratio < 1 and row.measured_speedup > 0
    trained = json.loads((out / "report.json").read_text())["context"]["trained_here"]
    assert trained["iterations"] == 8 and trained["path"] == "trained-here-T4.safetensors"
    assert "was trained by this run" in (out / "report.md").read_text()


def test_report_numbers_are_consistent(report):
    _, results = report
    by_name = {r.method: r for r in results}
    assert by_name["uncached"].cache_usage_ratio == 0 and by_name["full"].cache_usage_ratio == 0
    # the full schedule runs every unit, so it reproduces the uncached samples up to fp32 rounding
    assert by_name["full"].psnr > 80 and by_name["full"].ssim > 0.999
    # T=4: FORA N=2 computes steps 0 and 2, N=3 steps 0 and 3
    assert by_name["FORA N=2"].cache_usage_ratio == pytest.approx(0.5)
    assert by_name["FORA N=3"].cache_usage_ratio == pytest.approx(0.5)
    for name in ("FORA N=2", "FORA N=3"):
        r = by_name[name]
        assert 1 < r.ideal_speedup < 2 and r.measured_speedup > 0
        assert 10 < r.psnr < 80, "reuse must change the samples, but not destroy them"


def test_packaged_routers_join_the_report_and_the_peers(tmp_path):
    """At T=20 the packaged routers are in the table; the peers' comparison lands in compare/."""
    from harmonica.quickstart import packaged_routers

    routers = packaged_routers(20)
    assert routers, "the reference model ships routers for 20 steps"
    results = run_quickstart(
        tmp_path,
        n_per_class=2,
        num_inference_steps=20,
        timing_batch=2,
        timing_repeats=1,
        train_iterations=0,
        progress=False,
    )
    names = {r.method for r in results}
    assert {f"router {p.stem}" for p in routers} <= names
    compared = json.loads((tmp_path / "compare" / "report.json").read_text())
    rows = {r["method"]: r for r in compared["rows"]}
    assert any(name.startswith("FBCache") for name in rows)
    assert "compare/report.md" in (tmp_path / "report.md").read_text()


def test_cli_info():
    proc = subprocess.run(
        [sys.executable, "-m", "harmonica.cli", "info"], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("harmonica ") and "backends:" in proc.stdout


def test_cli_rejects_bad_arguments():
    proc = subprocess.run(
        [sys.executable, "-m", "harmonica.cli", "quickstart", "--n-per-class", "1", "--out", "unused"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode != 0 and "n_per_class must be at least 2" in proc.stderr
