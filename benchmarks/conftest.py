"""Shared benchmark machinery: device naming, copy bandwidth, side-by-side ratios, JSON results.

Every benchmark records a row (group, implementation, median time, bytes or FLOPs); at the end of
the session rows are grouped and each group's ratios against its baseline are computed from
timings taken in this same run, then written to ``benchmarks/results/<suite>-<device>.json``.
With ``--benchmark-disable`` (CI's smoke mode) everything runs once and nothing is written.
"""

from __future__ import annotations

import json
import os
import platform
import re
import statistics
import tempfile
import time
from pathlib import Path

import pytest
import torch

RESULTS_DIR = Path(__file__).parent / "results"


def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{model} ({torch.get_num_threads()} threads)"


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:60]


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


@pytest.fixture(scope="session")
def device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(scope="session")
def copy_bandwidth(device: str) -> float:
    """This machine's device-to-device copy bandwidth in GB/s (read + write), median of 20 copies."""
    numel = (256 if device == "cuda" else 64) * 2**20 // 4
    src = torch.randn(numel, device=device)
    dst = torch.empty_like(src)
    times = []
    for _ in range(22):
        sync(device)
        start = time.perf_counter()
        dst.copy_(src)
        sync(device)
        times.append(time.perf_counter() - start)
    return 2 * src.numel() * 4 / statistics.median(times[2:]) / 1e9


class Recorder:
    def __init__(self) -> None:
        self.rows: list[dict] = []

    def add(self, suite: str, row: dict) -> None:
        self.rows.append({"suite": suite, **row})


@pytest.fixture(scope="session")
def recorder(request, device):
    rec = Recorder()
    yield rec
    if request.config.getoption("benchmark_disable") or not rec.rows:
        return
    for suite in sorted({r["suite"] for r in rec.rows}):
        rows = [r for r in rec.rows if r["suite"] == suite]
        _add_ratios(rows)
        payload = {
            "suite": suite,
            "device": device_name(device),
            "device_type": device,
            "torch": torch.__version__,
            "date": time.strftime("%Y-%m-%d"),
            "rows": rows,
        }
        RESULTS_DIR.mkdir(parents=True, exist_ok=True)
        target = RESULTS_DIR / f"{suite}-{slug(device_name(device))}.json"
        with tempfile.NamedTemporaryFile("w", dir=RESULTS_DIR, delete=False, suffix=".tmp") as f:
            json.dump(payload, f, indent=1)
        os.replace(f.name, target)


def _add_ratios(rows: list[dict]) -> None:
    """`speedup` of each row = its group's baseline median / its median (same run, same device),
    unless the benchmark measured it itself (e.g. from paired rounds)."""
    groups: dict[str, list[dict]] = {}
    for row in rows:
        groups.setdefault(row["group"], []).append(row)
    for members in groups.values():
        base = [r for r in members if r.get("baseline")]
        if base:
            for r in members:
                r.setdefault("speedup", base[0]["median_s"] / r["median_s"])


def measure(benchmark, fn, device: str, inner: int | None = None) -> float | None:
    """Benchmarks `fn` and returns its median seconds per call (None under --benchmark-disable).
    On CUDA each timed round runs `inner` calls then synchronises, so the sync's cost is spread
    over many kernels."""
    inner = inner or (20 if device == "cuda" else 1)

    def run():
        for _ in range(inner):
            fn()
        sync(device)

    run()  # warm-up (allocator, lazy init, autotuning)
    benchmark(run)
    if benchmark.disabled:
        return None
    return benchmark.stats.stats.median / inner
