"""Train the routers that ship with the reference model (the evidence run of METHOD.md §3–6).

Learned routers for the reference digits DiT at T = 20 DDIM steps, CFG 1.5, all in budget mode at
the same target cache usage ratio so they compare at the same compute:

- ``harmonica``: SDT + IEPO as published (the released-code λ, measured with the soft router);
- ``harmonica-plus``: SDT + IEPO with λ measured on the hard schedule and a straight-through forward,
  so training sees the trajectory inference runs;
- ``harmonica-loo``: SDT + IEPO with the poster's leave-one-out λ;
- ``sdt``: SDT with λ ≡ 1 (the paper's ablation without IEPO);
- ``l2c``: Learning-to-Cache on the training digits, with its alternating refresh.

Same iteration count (1 000, ~50 trajectories against the paper's 2 000), batch and seed for all,
with :func:`train_router`'s default learning rate for that length. Each run checkpoints and
resumes. Writes ``<out>/<name>-T<steps>.safetensors`` and ``<out>/<name>-T<steps>.history.json``.

Run: ``python -m harmonica.reference.train_routers --only harmonica --threads 1``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from .._io import write_text
from ..training import train_router
from . import ASSETS, load_model, load_scheduler

RUNS = {
    "harmonica": dict(method="harmonica", lambda_variant="marginal"),
    "harmonica-plus": dict(
        method="harmonica", lambda_variant="marginal", lambda_on="hard", straight_through=True
    ),
    "harmonica-loo": dict(method="harmonica", lambda_variant="leave_one_out"),
    "sdt": dict(method="harmonica", lambda_variant="none"),
    "l2c": dict(method="l2c"),
}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ASSETS / "routers")
    parser.add_argument("--only", choices=sorted(RUNS), action="append", help="runs to do (default: all)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--iterations", type=int, default=1000)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--lr", type=float, default=None, help="default: train_router's")
    parser.add_argument("--target-cur", type=float, default=0.4)
    parser.add_argument("--lambda-every", type=int, default=500)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--checkpoint-root", type=Path, default=None, help="default: <out>/.checkpoints")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    checkpoint_root = args.checkpoint_root or args.out / ".checkpoints"
    for name in args.only or list(RUNS):
        result = train_router(
            load_model(),
            load_scheduler(),
            num_steps=args.steps,
            iterations=args.iterations,
            batch_size=args.batch,
            lr=args.lr,
            target_cur=args.target_cur,
            lambda_every=args.lambda_every,
            seed=args.seed,
            checkpoint_dir=checkpoint_root / name,
            **RUNS[name],
        )
        stem = f"{name}-T{args.steps}"
        result.router.save(args.out / f"{stem}.safetensors")
        write_text(args.out / f"{stem}.history.json", json.dumps(result.history, indent=1) + "\n")
        print(f"{stem}: CUR {result.router.training_settings['cur']:.1%}, {result.seconds:.0f} s")


if __name__ == "__main__":
    main()
