"""Shared benchmark machinery: size convention, device naming, timing, copy bandwidth, JSON results.

Sizes (``HARMONICA_BENCH_SIZE``):

- ``smoke``: tiny shapes, a few ms per benchmark; what CI runs (``pytest benchmarks
  --benchmark-disable`` picks it when the variable is unset). Results are only written when
  ``HARMONICA_BENCH_RESULTS`` names a folder, so smoke numbers never overwrite committed ones.
- ``cpu``: shapes sized for a CPU (kernels at DiT-XL/2 and PixArt-α activation sizes, end to end on
  DiT-S/2-shaped models). The default without CUDA.
- ``gpu``: the paper's settings (kernels at the same activation sizes; end to end DiT-XL/2 256² and
  PixArt-α 1024², bf16, 20 steps). The default with CUDA.

Every benchmark records a row (group, implementation, median time, bytes or FLOPs, the derived
ratios) with :class:`Recorder`; rows are written as they come (atomically) to
``<results>/<suite>-<device>.json`` so a run cut short keeps what it measured. Rows of an earlier
run in the same file are kept unless this run measures the same ``(group, impl)``; ratios are only
ever computed between rows of the same run. ``HARMONICA_BENCH_THREADS=N`` sets torch's CPU threads
for the whole session. ``harmonica bench`` renders the files as markdown tables.
"""

from __future__ import annotations

import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

RESULTS_DIR = Path(__file__).parent / "results"
SIZES = ("smoke", "cpu", "gpu")

_benchmark_disabled = False


def pytest_configure(config: pytest.Config) -> None:
    global _benchmark_disabled
    _benchmark_disabled = bool(config.getoption("benchmark_disable", default=False))
    threads = os.environ.get("HARMONICA_BENCH_THREADS")
    if threads:
        torch.set_num_threads(int(threads))


def bench_size() -> str:
    """The size convention of this session: ``HARMONICA_BENCH_SIZE``, else ``smoke`` under
    ``--benchmark-disable``, else ``gpu`` with CUDA and ``cpu`` without."""
    size = os.environ.get("HARMONICA_BENCH_SIZE", "").strip().lower()
    if size:
        if size not in SIZES:
            raise pytest.UsageError(f"HARMONICA_BENCH_SIZE must be one of {', '.join(SIZES)}, got {size!r}")
        return size
    if _benchmark_disabled:
        return "smoke"
    return "gpu" if torch.cuda.is_available() else "cpu"


def results_dir() -> Path | None:
    """Where results go: ``HARMONICA_BENCH_RESULTS``, else benchmarks/results (None in smoke size)."""
    explicit = os.environ.get("HARMONICA_BENCH_RESULTS")
    if explicit:
        return Path(explicit)
    return None if bench_size() == "smoke" else RESULTS_DIR


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


def timed(fn: Callable[[], Any], device: str) -> tuple[Any, float]:
    """``(fn(), seconds)``. On CUDA the time is between two CUDA events around the call, and the
    end event is waited for, so it is the device's wall-clock time including launch gaps."""
    if device == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        out = fn()
        end.record()
        end.synchronize()
        return out, start.elapsed_time(end) / 1e3
    begin = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - begin


@pytest.fixture(scope="session")
def device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(scope="session")
def copy_bandwidth(request, device: str) -> float:
    """This machine's device-to-device copy bandwidth in GB/s (read + write), median of 20 copies of
    a buffer far larger than the caches (NaN when benchmarks are disabled: nothing is timed)."""
    if request.config.getoption("benchmark_disable"):
        return float("nan")
    mib = 512 if device == "cuda" else {"smoke": 8, "cpu": 64, "gpu": 64}[bench_size()]
    src = torch.randn(mib * 2**20 // 4, device=device)
    dst = torch.empty_like(src)
    times = [timed(lambda: dst.copy_(src), device)[1] for _ in range(22)]
    return 2 * src.numel() * 4 / statistics.median(times[2:]) / 1e9


def _git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=Path(__file__).parent,
            capture_output=True,
            text=True,
            timeout=5,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def _environment(device: str) -> dict[str, Any]:
    import harmonica_kernels as hk

    env: dict[str, Any] = {
        "device": device_name(device),
        "device_type": device,
        "size": bench_size(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
        "backend": hk.get_backend(device),
        "backends_available": hk.available_backends(),
        "commit": _git_commit(),
    }
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    return env


class Recorder:
    """Collects result rows and keeps ``<results>/<suite>-<device>.json`` up to date.

    A row is a flat dict with at least ``group`` (what is compared side by side), ``impl`` (which
    implementation or variant) and ``median_s``; ``baseline: True`` marks the row the rest of its
    group is compared with (each row without its own ``speedup`` gets ``baseline / own median``).
    Add what is needed to read the number: shape, dtype, bytes or FLOPs, derived rates.
    """

    def __init__(self, device: str, directory: Path | None) -> None:
        self.device = device
        self.directory = directory
        self.session = time.strftime("%Y-%m-%dT%H:%M:%S")
        self.rows: list[dict[str, Any]] = []
        self._environment: dict[str, Any] | None = None

    def path(self, suite: str) -> Path | None:
        if self.directory is None:
            return None
        return self.directory / f"{suite}-{slug(device_name(self.device))}.json"

    def add(self, suite: str, row: dict[str, Any]) -> None:
        self.rows.append({"suite": suite, **row, "session": self.session})
        self.write(suite)

    def write(self, suite: str) -> None:
        target = self.path(suite)
        if target is None:
            return
        if self._environment is None:
            self._environment = _environment(self.device)
        ours = [r for r in self.rows if r["suite"] == suite]
        measured = {(r["group"], r["impl"]) for r in ours}
        previous = _load_rows(target, self._environment["size"])
        rows = [r for r in previous if (r.get("group"), r.get("impl")) not in measured] + ours
        add_ratios(rows)
        payload = {
            "suite": suite,
            **self._environment,
            "date": time.strftime("%Y-%m-%d"),
            "command": " ".join(["pytest", *sys.argv[1:]]),
            "rows": rows,
        }
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", dir=target.parent, delete=False, suffix=".tmp") as f:
            json.dump(payload, f, indent=1)
        os.replace(f.name, target)


def _load_rows(path: Path, size: str) -> list[dict[str, Any]]:
    """Rows of an existing results file measured at the same size (none if unreadable)."""
    try:
        payload = json.loads(path.read_text())
    except (OSError, ValueError):
        return []
    if payload.get("size", size) != size:
        return []
    return [r for r in payload.get("rows", []) if isinstance(r, dict)]


@pytest.fixture(scope="session")
def recorder(device) -> Recorder:
    rec = Recorder(device, results_dir())
    yield rec
    for path in sorted({rec.path(r["suite"]) for r in rec.rows} - {None}):
        print(f"\nbenchmark results: {path}")


def add_ratios(rows: list[dict[str, Any]]) -> None:
    """Sets ``speedup`` = the baseline's median / the row's median for every row of a group that
    has a baseline row measured in the same session, unless the row measured its own."""
    groups: dict[tuple[Any, Any], list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault((row.get("session"), row["group"]), []).append(row)
    for members in groups.values():
        base = [r for r in members if r.get("baseline")]
        if base:
            for r in members:
                r.setdefault("speedup", base[0]["median_s"] / r["median_s"])


def interleaved_ratio(baseline: Callable[[], Any], fn: Callable[[], Any], pairs: int = 15) -> float:
    """Median over ``pairs`` of baseline time / ``fn`` time, the two calls back to back in alternating
    order (host clock; CPU only). Rows timed one after the other carry the machine's drift between
    them; a pair of adjacent calls does not."""
    ratios = []
    for i in range(pairs + 1):  # the first pair warms both up and is dropped
        order = (baseline, fn) if i % 2 else (fn, baseline)
        seconds = {}
        for call in order:
            start = time.perf_counter()
            call()
            seconds[call] = time.perf_counter() - start
        if i:
            ratios.append(seconds[baseline] / seconds[fn])
    return statistics.median(ratios)


def measure(benchmark, fn: Callable[[], Any], device: str, inner: int | None = None) -> float | None:
    """Benchmarks `fn` and returns its median seconds per call (None under --benchmark-disable).

    CPU: pytest-benchmark's calibrated rounds, host clock. CUDA: 15 rounds of `inner` calls each,
    timed with CUDA events around the round (so launch gaps count and the sync is paid once per
    round), median over the rounds."""
    inner = inner or (20 if device == "cuda" else 1)
    if device != "cuda":

        def run_cpu():
            for _ in range(inner):
                fn()

        run_cpu()  # warm-up (allocator, lazy init)
        benchmark(run_cpu)
        return None if benchmark.disabled else benchmark.stats.stats.median / inner

    seconds: list[float] = []

    def calls():
        for _ in range(inner):
            fn()

    def run_cuda():
        seconds.append(timed(calls, device)[1])

    run_cuda()  # warm-up (lazy module loading, autotuning, JIT compilation)
    seconds.clear()
    benchmark.pedantic(run_cuda, rounds=15, iterations=1, warmup_rounds=1)
    if benchmark.disabled:
        return None
    return statistics.median(seconds[1:]) / inner


def host_seconds_per_call(fn: Callable[[], Any], device: str, calls: int = 200, rounds: int = 5) -> float:
    """What issuing one call costs the host: the median over ``rounds`` of a loop of ``calls`` calls
    between two host clock reads, divided by ``calls``. On CUDA nothing inside the loop waits for the
    device (it is synchronised between rounds only), so a kernel shorter than its launch shows the
    launch cost, and a longer one still shows what the host spent issuing it (unless the launch
    queue fills up: keep ``calls`` well under its ~1000 entries)."""
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    fn()  # warm-up
    per_call = []
    for _ in range(rounds):
        sync()
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        per_call.append((time.perf_counter() - start) / calls)
    sync()
    return statistics.median(per_call)


def graph_seconds_per_call(fn: Callable[[], Any], device: str, rep_ms: float = 25) -> float | None:
    """Device time of one call with no host in the way: ``fn`` captured in a CUDA graph and replayed
    (``triton.testing.do_bench_cudagraph``, median in seconds). It does not flush the L2 cache
    between replays: callers rotate over input sets that exceed it. None off CUDA (no graphs)."""
    if device != "cuda":
        return None
    from triton.testing import do_bench_cudagraph

    return do_bench_cudagraph(fn, rep=rep_ms, return_mode="median") / 1e3
