"""`harmonica bench`: benchmark JSON files rendered as markdown, and README sections rewritten."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from harmonica.bench import load_results, render, render_payload, update_readme
from harmonica.cli import main

REPO = Path(__file__).resolve().parents[2]


def _kernel_row(op, impl, dtype, median_s, session="s1", **extra):
    return {
        "suite": "kernels",
        "group": f"{op}/tiny/{dtype}",
        "op": op,
        "impl": impl,
        "baseline": impl == "unfused",
        "shape": [2, 24, 72],
        "shape_name": "tiny",
        "dtype": dtype,
        "median_s": median_s,
        "bytes": 1000,
        "gbps": 1000 / median_s / 1e9,
        "pct_copy_bandwidth": 50.0,
        "session": session,
        **extra,
    }


def _e2e_row(schedule, mode, median_s, **extra):
    return {
        "suite": "e2e",
        "group": "tiny DiT, 4 DDIM steps, batch 1+CFG, float32",
        "impl": f"{schedule} ({mode})",
        "schedule": schedule,
        "mode": mode,
        "cache_usage_ratio": {"uncached": 0.0, "full": 0.0, "fora2": 0.5, "mask37": 0.375}[schedule],
        "median_s": median_s,
        "backend": "cuda",
        "rounds": 3,
        "session": "s1",
        **extra,
    }


def _write(folder: Path, name: str, payload: dict) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(json.dumps(payload))
    return path


@pytest.fixture
def results(tmp_path):
    folder = tmp_path / "results"
    meta = {"device": "NVIDIA H100 80GB HBM3", "device_type": "cuda", "torch": "2.11.0", "cuda": "13.0"}
    meta |= {"size": "gpu", "date": "2026-11-27", "backend": "cuda"}
    kernels = [
        _kernel_row("cached_gated_residual", "fused (cuda)", "float32", 2e-6),
        _kernel_row("cached_gated_residual", "unfused", "float32", 6e-6),
        _kernel_row("cached_gated_residual", "addcmul", "float32", 3e-6),
        _kernel_row("cached_gated_residual", "fused (triton)", "float32", 2.5e-6),
        _kernel_row("cached_gated_residual", "fused (cuda)", "bfloat16", 1e-6),
        _kernel_row("cached_gated_residual", "unfused", "bfloat16", 4e-6),
        # a stale baseline from an older run must not pair with this run's fused row
        _kernel_row("gated_residual_update_", "unfused", "float32", 9.0, session="s0"),
        _kernel_row("gated_residual_update_", "fused (cuda)", "float32", 3e-6),
    ]
    e2e = [
        _e2e_row("uncached", "eager", 0.50, baseline=True, speedup=1.0),
        _e2e_row("fora2", "eager", 0.30, uncached_median_s=0.51, speedup=1.7, ideal_speedup=1.95,
                 pct_of_ideal=87.2),
        _e2e_row("uncached", "graph", 0.40, uncached_median_s=0.5, speedup=1.25, speedup_vs="uncached eager"),
        _e2e_row("mask37", "graph", 0.31, uncached_median_s=0.4, speedup=1.29, ideal_speedup=1.38,
                 pct_of_ideal=93.5),
        _e2e_row("full", "eager", 0.505, uncached_median_s=0.5, speedup=0.99, ideal_speedup=1.0,
                 pct_of_ideal=99.0),
    ]  # fmt: skip
    training = [{"group": "SDT step", "impl": "harmonica", "median_s": 0.2, "iterations": 5, "shape": [1, 2]}]
    _write(folder, "e2e-nvidia-h100.json", {"suite": "e2e", **meta, "rows": e2e})
    _write(folder, "kernels-nvidia-h100.json", {"suite": "kernels", **meta, "rows": kernels})
    _write(folder, "training-nvidia-h100.json", {"suite": "training", **meta, "rows": training})
    _write(folder, "pytest-benchmark.json", {"machine_info": {}, "benchmarks": []})  # not ours: skipped
    (folder / "broken.json").write_text("{")
    return folder


def test_load_results_orders_suites_and_skips_foreign_files(results):
    payloads = load_results(results)
    assert [p["suite"] for p in payloads] == ["kernels", "e2e", "training"]
    assert all(Path(p["path"]).parent == results for p in payloads)
    assert [p["suite"] for p in load_results(results, suites=["e2e"])] == ["e2e"]


def test_load_results_errors_name_the_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="no results folder"):
        load_results(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="run `pytest benchmarks`"):
        load_results(tmp_path)


def test_kernel_table(results):
    (payload,) = load_results(results, suites=["kernels"])
    text = render_payload(payload)
    assert "**kernels** on **NVIDIA H100 80GB HBM3**" in text
    assert "torch 2.11.0 (CUDA 13.0)" in text and "size `gpu`" in text
    assert "Shape B, N, D = 2, 24, 72 (tiny)" in text
    lines = {ln.removeprefix("| `").replace("`", "") for ln in text.splitlines() if ln.startswith("| `")}
    # ratio = baseline time / fused time, per dtype; a dtype without the pair shows a dash
    op = "cached_gated_residual"
    assert f"{op} | cuda | unfused | 2 µs | 6 µs | 3.00× | 50 % | 1 µs | 4 µs | 4.00× | 50 % |" in lines
    assert f"{op} | cuda | addcmul | 2 µs | 3 µs | 1.50× | 50 % | 1 µs | – | – | 50 % |" in lines
    assert any(line.startswith(f"{op} | triton | unfused | 2.5 µs | 6 µs | 2.40×") for line in lines)
    assert "gated_residual_update_ | cuda | unfused | 3 µs | – | – | 50 % | – | – | – | – |" in lines


def test_kernel_table_prefers_interleaved_ratios():
    rows = [
        _kernel_row("cached_gated_residual", "fused (cpp)", "float32", 2e-6,
                    paired_speedups={"unfused": 2.5, "addcmul": 1.02}),
        _kernel_row("cached_gated_residual", "unfused", "float32", 6e-6),
        _kernel_row("cached_gated_residual", "addcmul", "float32", 1e-6),
    ]  # fmt: skip
    text = render_payload({"suite": "kernels", "device": "AMD EPYC (2 threads)", "rows": rows})
    assert "ratios from interleaved pairs of calls" in text
    # the rows' own times stay; the ratio is the paired one, not 1e-6 / 2e-6
    assert "| `cached_gated_residual` | cpp | addcmul | 2 µs | 1 µs | 1.02× | 50 % |" in text
    assert "| `cached_gated_residual` | cpp | unfused | 2 µs | 6 µs | 2.50× | 50 % |" in text


def test_e2e_table(results):
    (payload,) = load_results(results, suites=["e2e"])
    text = render_payload(payload)
    body = [line for line in text.splitlines() if line.startswith("| ") and "---" not in line][1:]
    # eager rows first, in variant order, then graph rows
    assert [line.split(" | ")[0:2] for line in body] == [
        ["| uncached", "eager"],
        ["| `CacheSchedule.full`", "eager"],
        ["| FORA N=2", "eager"],
        ["| uncached", "graph"],
        ["| `from_mask`, CUR 37.5 %", "graph"],
    ]
    assert "| uncached | eager | 0.0 % | 500 ms | – | 1.00× (baseline) | – | – |" in body
    assert "| FORA N=2 | eager | 50.0 % | 300 ms | 510 ms | 1.70× | 1.95× | 87 % |" in body
    assert "| uncached | graph | 0.0 % | 400 ms | 500 ms | 1.25× vs eager | – | – |" in body
    assert "`cuda` ops, median of 3 paired rounds" in text


def test_e2e_lockstep_rows_show_the_range_over_rounds():
    cpu = dict(backend="cpp", device="cpu", threads=2)
    rows = [
        _e2e_row("uncached", "eager", 0.50, baseline=True, speedup=1.0, ops_per_run=9000, **cpu),
        _e2e_row("fora2", "eager", 0.26, uncached_median_s=0.5, speedup=1.93, speedups=[1.9, 1.93, 2.04],
                 ideal_speedup=2.0, pct_of_ideal=96.5, pairing="lockstep", ops_per_run=5000, **cpu),
    ]  # fmt: skip
    text = render_payload({"suite": "e2e", "device": "AMD EPYC (2 threads)", "rows": rows})
    assert "| % of ideal | ops / run |" in text
    assert "| uncached | eager | 0.0 % | 500 ms | – | 1.00× (baseline) | – | – | 9000 |" in text
    assert "| FORA N=2 | eager | 50.0 % | 260 ms | 500 ms | 1.93× (1.90–2.04) | 2.00× | 96 % | 5000 |" in text
    assert "(`cpp` ops, 2 threads, median of 3 lockstep rounds)" in text


def test_other_suites_render_as_plain_tables(results):
    (payload,) = load_results(results, suites=["training"])
    text = render_payload(payload)
    assert "| group | impl | median_s | iterations |" in text
    assert "| SDT step | harmonica | 200 ms | 5 |" in text


def test_plain_tables_split_by_group_when_their_columns_do_not_fit_one():
    """Up to 12 columns one table; beyond, one table per group, so no row loses its columns."""
    narrow = [{"group": "a", "impl": "x", "median_s": 0.5, **{f"k{i}": i for i in range(5)}}]
    wide = [{"group": "b", "impl": "y", **{f"w{i}": i for i in range(8)}}]
    assert render_payload({"suite": "training", "rows": narrow}).count("| group | impl |") == 1
    text = render_payload({"suite": "training", "rows": narrow + wide})
    assert text.count("| group | impl |") == 2
    assert "| group | impl | median_s | k0 | k1 | k2 | k3 | k4 |" in text
    assert "| group | impl | w0 | w1 | w2 | w3 | w4 | w5 | w6 | w7 |" in text
    assert "| b | y | 0 | 1 | 2 | 3 | 4 | 5 | 6 | 7 |" in text


def test_update_readme_rewrites_only_marked_sections(results, tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text(
        "# title\n\nprose before\n\n"
        "<!-- harmonica-bench:begin e2e -->\nold e2e table\n<!-- harmonica-bench:end -->\n\n"
        "middle prose\n\n"
        "<!-- harmonica-bench:begin kernels -->\n<!-- harmonica-bench:end -->\n"
        "<!-- harmonica-bench:begin nothing-yet -->\nx\n<!-- harmonica-bench:end -->\n"
        "tail\n"
    )
    readme.chmod(0o644)
    payloads = load_results(results)
    assert update_readme(readme, payloads) == 3
    text = readme.read_text()
    assert text.startswith("# title\n\nprose before\n\n<!-- harmonica-bench:begin e2e -->\n**e2e** on")
    assert "old e2e table" not in text and "middle prose" in text and text.endswith("tail\n")
    assert "(results/e2e-nvidia-h100.json)" in text  # links relative to the README's folder
    e2e_part = text.split("middle prose")[0]
    assert "**kernels**" not in e2e_part and "**training**" not in e2e_part
    assert "(no `nothing-yet` results yet)" in text
    assert readme.stat().st_mode & 0o777 == 0o644
    assert not list(tmp_path.glob("*.tmp"))
    # idempotent: rendering the same results again changes nothing
    update_readme(readme, payloads)
    assert readme.read_text() == text
    # one suite's results rewrite its sections only, never another suite's
    assert update_readme(readme, load_results(results, suites=["kernels"]), suites=["kernels"]) == 1
    assert readme.read_text() == text


def test_update_readme_refuses_files_without_markers(results, tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("no markers\n")
    with pytest.raises(ValueError, match="no generated-table markers"):
        update_readme(readme, load_results(results))
    readme.write_text("<!-- harmonica-bench:begin -->\nunterminated\n")
    with pytest.raises(ValueError, match="has no <!-- harmonica-bench:end -->"):
        update_readme(readme, load_results(results))
    assert readme.read_text() == "<!-- harmonica-bench:begin -->\nunterminated\n"


def test_cli_prints_and_updates_readme(results, tmp_path, capsys):
    readme = tmp_path / "README.md"
    readme.write_text("<!-- harmonica-bench:begin -->\n<!-- harmonica-bench:end -->\n")
    assert main(["bench", "--results", str(results), "--readme", str(readme), "--suite", "kernels"]) == 0
    out = capsys.readouterr().out
    assert "**kernels** on" in out and "**e2e**" not in out
    assert "1 generated section(s) rewritten" in out
    assert "**kernels** on" in readme.read_text()
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", "--results", str(tmp_path / "missing")])
    assert exit_info.value.code == 2
    assert "harmonica bench: error: no results folder" in capsys.readouterr().err


def test_results_written_by_the_benchmark_recorder_render(tmp_path, monkeypatch):
    """The real writer (benchmarks/conftest.py's Recorder) and the renderer agree on the format."""
    from benchmarks.conftest import Recorder

    monkeypatch.setenv("HARMONICA_BENCH_SIZE", "smoke")
    recorder = Recorder("cpu", tmp_path)
    recorder.add("kernels", _kernel_row("cached_gated_residual", "fused (cpp)", "float32", 2e-6))
    recorder.add("kernels", _kernel_row("cached_gated_residual", "unfused", "float32", 5e-6))
    recorder.add("e2e", _e2e_row("uncached", "eager", 0.5, baseline=True))
    recorder.add("e2e", _e2e_row("fora2", "eager", 0.25, uncached_median_s=0.5, speedup=2.0))
    payloads = load_results(tmp_path)
    assert [p["suite"] for p in payloads] == ["kernels", "e2e"]
    kernels = payloads[0]
    assert kernels["size"] == "smoke" and kernels["device_type"] == "cpu" and kernels["backend"]
    fused = next(r for r in kernels["rows"] if r["impl"] == "fused (cpp)")
    assert fused["speedup"] == pytest.approx(2.5)  # computed against the same run's baseline
    text = render(payloads)
    assert "| `cached_gated_residual` | cpp | unfused | 2 µs | 5 µs | 2.50× |" in text
    assert "| FORA N=2 | eager | 50.0 % | 250 ms | 500 ms | 2.00× |" in text
    # a second run replaces its own rows and keeps the others
    again = Recorder("cpu", tmp_path)
    again.add("e2e", _e2e_row("fora2", "eager", 0.2, uncached_median_s=0.5, speedup=2.5))
    (e2e,) = load_results(tmp_path, suites=["e2e"])
    assert sorted(r["impl"] for r in e2e["rows"]) == ["fora2 (eager)", "uncached (eager)"]
    assert next(r for r in e2e["rows"] if r["impl"] == "fora2 (eager)")["speedup"] == 2.5


def test_committed_results_render():
    folder = REPO / "benchmarks" / "results"
    assert any(folder.glob("*.json")), "the README's tables come from benchmarks/results/*.json"
    text = render(load_results(folder), link_from=REPO)
    assert "](benchmarks/results/" in text
    assert "| schedule | mode |" in text or "| op | fused |" in text
