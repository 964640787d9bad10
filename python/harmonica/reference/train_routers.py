"""Train the routers that ship with the reference model (the evidence run of METHOD.md §3–6).

Learned routers for the reference digits DiT at T = 20 DDIM steps, CFG 1.5, all in budget mode at
the same target cache usage ratio so they compare at the same compute:

- ``harmonica``: SDT + IEPO as published (the released-code λ, measured with the soft router);
- ``harmonica-plus``: SDT + IEPO with λ measured on the hard schedule and a straight-through forward,
  so training sees the trajectory inference runs;
- ``harmonica-plus-age2``: the same with reused entries at most 2 steps old;
- ``harmonica-steps``: the released-code λ (soft), straight-through, age cap 2 and one logit per step
  (whole steps reused together; λ on a hard schedule that reuses nothing is ~0 and gives β no
  scale);
- ``harmonica-loo``: SDT + IEPO with the poster's leave-one-out λ;
- ``sdt``: SDT with λ ≡ 1 (the paper's ablation without IEPO);
- ``l2c``: Learning-to-Cache on the training digits, with its alternating refresh;
- ``harmonica-forecast`` (train_router's defaults; ``--usage-in-name`` for several budgets): as
  ``harmonica-steps``, but each row's gradient taken where it is reused and every reused step forecast
  at order 2, coefficients fitted on the training calls, the router's own fitted after training.

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
from ..search import schedule_router
from ..training import train_router
from . import ASSETS, load_model, load_scheduler

_PUBLISHED = dict(straight_through=False, max_age=None, tie_steps=False, forecast_order=0, exchanges=0)
RUNS = {
    "harmonica": dict(method="harmonica", lambda_variant="marginal", **_PUBLISHED),
    "harmonica-plus": dict(
        method="harmonica",
        lambda_variant="marginal",
        lambda_on="hard",
        **{**_PUBLISHED, "straight_through": True, "gradient_at": "hard"},
    ),
    "harmonica-plus-age2": dict(
        method="harmonica",
        lambda_variant="marginal",
        lambda_on="hard",
        straight_through=True,
        max_age=2,
        tie_steps=False,
        gradient_at="hard",
        forecast_order=0,
        exchanges=0,
    ),
    "harmonica-steps": dict(
        method="harmonica",
        lambda_variant="marginal",
        straight_through=True,
        max_age=2,
        tie_steps=True,
        gradient_at="hard",
        forecast_order=0,
        exchanges=0,
    ),
    "harmonica-loo": dict(method="harmonica", lambda_variant="leave_one_out", **_PUBLISHED),
    "sdt": dict(method="harmonica", lambda_variant="none", **_PUBLISHED),
    "l2c": dict(method="l2c"),
    "harmonica-forecast": dict(method="harmonica"),
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
    parser.add_argument(
        "--usage-in-name", action="store_true", help="name files <name>-T<steps>-<pct> (several budgets)"
    )
    parser.add_argument("--lambda-every", type=int, default=500)
    parser.add_argument(
        "--exchanges",
        type=int,
        default=None,
        help="harmonica-forecast: exchange passes (default: train_router's)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--checkpoint-root", type=Path, default=None, help="default: <out>/.checkpoints")
    parser.add_argument(
        "--search",
        type=_targets,
        default=None,
        metavar="U1,U2,...",
        help="instead of training: search schedules at these usages, or polish --start to them",
    )
    parser.add_argument("--max-age", type=int, default=None, help="search: cap on a reused entry's age")
    parser.add_argument(
        "--forecast-order",
        type=int,
        default=0,
        choices=(0, 1, 2),
        help="search: forecast reused entries at this order, coefficients fitted (forecast-T<steps>-<pct>)",
    )
    parser.add_argument(
        "--search-batch", type=int, default=8, help="search: noise samples errors are measured on"
    )
    parser.add_argument(
        "--start", default=None, help="search: a trained router (a RUNS name in --out) to polish"
    )
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.search is not None:
        _search(args)
        return
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
            checkpoint_dir=checkpoint_root / (f"{name}-{args.target_cur}" if args.usage_in_name else name),
            **{**RUNS[name], **({} if args.exchanges is None else {"exchanges": args.exchanges})},
        )
        stem = f"{name}-T{args.steps}" + (f"-{round(100 * args.target_cur)}" if args.usage_in_name else "")
        result.router.save(args.out / f"{stem}.safetensors")
        write_text(args.out / f"{stem}.history.json", json.dumps(result.history, indent=1) + "\n")
        print(f"{stem}: CUR {result.router.training_settings['cur']:.1%}, {result.seconds:.0f} s")


def _targets(text: str) -> list[float]:
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected usages such as 0.35,0.4,0.5") from None


def _search(args: argparse.Namespace) -> None:
    """Searched schedules (``search-a<age>-T<steps>-<pct>``; with forecasting ``forecast-T<steps>-<pct>``)
    or a trained router polished to each usage
    (``<name>-polished-T<steps>-<pct>``), in the order given (each extends or trims the one before)."""
    from ..router import Router
    from ..search import search_schedule

    model = load_model()
    start = (
        Router.load(args.out / f"{args.start}-T{args.steps}.safetensors", model=model) if args.start else None
    )
    result = search_schedule(
        model,
        load_scheduler(),
        num_steps=args.steps,
        target_cur=args.search,
        start=start,
        max_age=args.max_age,
        forecast_order=args.forecast_order,
        batch_size=args.search_batch,
        seed=args.seed,
    )
    if args.start:
        prefix = f"{args.start}-polished"
    elif args.forecast_order:
        prefix = "forecast"
    else:
        prefix = f"search-a{args.max_age or 'none'}-b{args.search_batch}"
    for target, schedule in result.schedules.items():
        stem = f"{prefix}-T{args.steps}-{round(100 * target)}"
        settings = {
            **result.router.training_settings,
            "target_cur": target,
            "cur": schedule.cache_usage_ratio,
        }
        if start is not None:
            settings["polished_from"] = start.training_settings
        router = schedule_router(model, schedule, load_scheduler(), settings)
        router.save(args.out / f"{stem}.safetensors")
        print(f"{stem}: CUR {schedule.cache_usage_ratio:.1%}")
    write_text(args.out / f"{prefix}-T{args.steps}.history.json", json.dumps(result.history, indent=1) + "\n")
    print(f"{result.forwards} sampling forwards in {result.seconds:.0f} s")


if __name__ == "__main__":
    main()
