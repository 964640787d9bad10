"""Where do the packaged routers cache, and where does caching hurt the reference model?

Writes ``<out>/router-diagnosis.md`` and ``.json`` with, for T = 20 DDIM steps and CFG 1.5:

- per step t, the fidelity cost of caching *every* unit at that one step only (all other steps
  computed): PSNR / MSE of the final samples against the uncached ones from the same noise;
- per packaged router (τ = 0.1): the share of units cached at each step, the mean and the largest age
  of a reused cache entry (steps since the unit last ran), and the IEPO weights λ_t it ended with.

Run: ``python -m harmonica.reference.diagnose_routers --out docs``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from .._io import write_text
from ..cache import disable_cache, enable_cache
from ..eval import mse, psnr
from ..models import units
from ..router import Router
from ..sampling import sample
from ..schedule import CacheSchedule
from . import ASSETS, load_model, load_scheduler


def cache_ages(compute: torch.Tensor) -> list[int]:
    """Age (steps since the unit last ran) of every reused (step, unit) entry of a schedule."""
    ages = []
    for unit in range(compute.shape[1]):
        last = 0
        for step in range(compute.shape[0]):
            if compute[step, unit]:
                last = step
            else:
                ages.append(step - last)
    return ages


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("docs"))
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--samples", type=int, default=40)
    parser.add_argument("--threshold", type=float, default=0.1)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--seed", type=int, default=123)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    model, scheduler = load_model(), load_scheduler()
    num_units = len(units(model))
    labels = torch.arange(args.samples) % 10
    size = model.config.sample_size
    noise = torch.randn(args.samples, 1, size, size, generator=torch.Generator().manual_seed(args.seed))
    reference = sample(model, scheduler, labels, num_inference_steps=args.steps, noise=noise)

    sensitivity = []
    for step in range(1, args.steps):
        mask = torch.ones(args.steps, num_units, dtype=torch.bool)
        mask[step] = False
        enable_cache(model, CacheSchedule.from_mask(mask))
        try:
            images = sample(model, scheduler, labels, num_inference_steps=args.steps, noise=noise)
        finally:
            disable_cache(model)
        sensitivity.append(
            {"step": step, "psnr": psnr(images, reference).item(), "mse": mse(images, reference).item()}
        )

    routers = {}
    for path in sorted((ASSETS / "routers").glob(f"*-T{args.steps}.safetensors")):
        router = Router.load(path, model=model)
        compute = router.to_schedule(args.threshold).compute
        ages = cache_ages(compute)
        routers[path.stem] = {
            "cur": float((~compute).float().mean()),
            "cached_share_per_step": [round(v, 3) for v in (~compute).float().mean(1).tolist()],
            "mean_cache_age": sum(ages) / max(len(ages), 1),
            "max_cache_age": max(ages, default=0),
            "lambda_final": router.training_settings.get("lambda_final"),
        }

    lines = [
        f"# Router diagnosis (reference model, {args.steps} DDIM steps, CFG 1.5, {args.samples} samples, "
        f"τ = {args.threshold})",
        "",
        "## Cost of caching every unit at one step only",
        "",
        "| step | PSNR dB vs uncached | MSE |",
        "|---|---|---|",
        *[f"| {s['step']} | {s['psnr']:.1f} | {s['mse']:.2e} |" for s in sensitivity],
        "",
        "## Where the packaged routers cache",
        "",
        "| router | CUR | mean / max cache age (steps) | cached share at steps 1, 2, 3 | at steps 10–17 |",
        "|---|---|---|---|---|",
    ]
    for name, r in routers.items():
        share = r["cached_share_per_step"]
        lines.append(
            f"| {name} | {r['cur']:.1%} | {r['mean_cache_age']:.2f} / {r['max_cache_age']} | "
            f"{share[1]:.0%}, {share[2]:.0%}, {share[3]:.0%} | {sum(share[10:18]) / 8:.0%} |"
        )
    lambdas = {
        n: r["lambda_final"] for n, r in routers.items() if r["lambda_final"] and max(r["lambda_final"]) != 1
    }
    if lambdas:
        lines += [
            "",
            "## IEPO weights λ_t the HarmoniCa routers ended with",
            "",
            "| step | " + " | ".join(lambdas) + " |",
        ]
        lines.append("|---|" + "---|" * len(lambdas))
        for step in range(1, args.steps):
            lines.append(f"| {step} | " + " | ".join(f"{v[step]:.2e}" for v in lambdas.values()) + " |")
    args.out.mkdir(parents=True, exist_ok=True)
    write_text(args.out / "router-diagnosis.md", "\n".join(lines) + "\n")
    write_text(
        args.out / "router-diagnosis.json",
        json.dumps({"sensitivity": sensitivity, "routers": routers}, indent=1) + "\n",
    )
    print("\n".join(lines))


if __name__ == "__main__":
    main()
