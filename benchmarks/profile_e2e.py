"""Where one denoising step's device time goes: the kernels of a step that computes every unit and
of a step that reuses every unit, for the first end-to-end setup of a size (DiT-XL/2 at ``gpu``).

The e2e benchmark times whole sampling runs; this splits one step of each kind by kernel (torch
profiler, eager, after a warm-up run), so a reuse step that costs more than its FLOPs say can be
read off: the kernels it launches, their count and their device time. Not a benchmark (no ratios,
no results file): a diagnostic printed to stdout. ``gpu_check.sh`` runs it after the e2e stage.

Run: ``python -m benchmarks.profile_e2e [--setup KEY] [--top N]``.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

from harmonica import CacheSchedule, disable_cache, enable_cache

from .conftest import bench_size
from .test_e2e import SETUPS, Bench, _reset


@dataclass(frozen=True)
class StepProfile:
    step: int
    reused: int  # units reused at this step
    kernels: int  # device kernels and copies (0 on a CPU)
    device_ms: float  # their summed device time
    span_ms: float  # first kernel start to last kernel end
    ops: int  # top-level ops on the host
    host_ms: float  # their summed host time
    table: str  # the profiler's per-op table, heaviest first

    def __str__(self) -> str:
        return (
            f"## step {self.step}: {self.reused} units reused\n"
            f"{self.kernels} kernels and copies, {self.device_ms:.3f} ms of device time over a span of "
            f"{self.span_ms:.3f} ms (eager: the rest is launch gaps); {self.ops} top-level ops, "
            f"{self.host_ms:.3f} ms on the host\n{self.table}"
        )


def profile_step(bench: Bench, schedule: CacheSchedule, step: int, top: int = 15) -> StepProfile:
    """Profile step ``step`` of a run under ``schedule`` (the steps before it run unprofiled)."""
    device = bench.device
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    enable_cache(bench.model, schedule)
    try:
        with torch.inference_mode():
            bench.generate()  # warm-up: kernel selection, cache buffers
            _reset(bench.model)
            x = bench.noise
            for i in range(step):
                x = bench.step(bench.model, x, i)
            sync()
            with profile(activities=activities) as prof:
                bench.step(bench.model, x, step)
                sync()
    finally:
        disable_cache(bench.model)
    kernels = [e for e in prof.events() if e.device_type == DeviceType.CUDA]
    ranges = [e.time_range for e in kernels]
    span_us = max((r.end for r in ranges), default=0) - min((r.start for r in ranges), default=0)
    ops = [e for e in prof.events() if e.device_type == DeviceType.CPU and e.cpu_parent is None]
    sort = "self_device_time_total" if device == "cuda" else "self_cpu_time_total"
    return StepProfile(
        step=step,
        reused=int((~schedule.compute[step]).sum()),
        kernels=len(kernels),
        device_ms=sum(e.device_time_total for e in kernels) / 1e3,
        span_ms=span_us / 1e3,
        ops=len(ops),
        host_ms=sum(e.cpu_time_total for e in ops) / 1e3,
        table=prof.key_averages().table(sort_by=sort, row_limit=top, max_name_column_width=60),
    )


def profile_run(bench: Bench, top: int = 15) -> tuple[StepProfile, StepProfile]:
    """Step 0 (every unit computed) and step 1 (every unit reused) of a run of ``bench``."""
    steps, num_units = bench.setup.steps, bench.num_units
    fora = CacheSchedule.fora(steps, num_units, steps)  # step 0 computes, every later step reuses
    return profile_step(bench, fora, 0, top), profile_step(bench, fora, 1, top)


def main() -> None:
    setups = {s.key: s for s in SETUPS[bench_size()]}
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--setup", choices=sorted(setups), default=next(iter(setups)))
    parser.add_argument("--top", type=int, default=15, help="rows of the per-op table printed for each step")
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    bench = Bench(setups[args.setup], device)
    print(f"# {bench.group} on {torch.cuda.get_device_name() if device == 'cuda' else 'cpu'}")
    for result in profile_run(bench, args.top):
        print(f"\n{result}")
    bench.close()


if __name__ == "__main__":
    main()
