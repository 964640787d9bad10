"""The ``harmonica`` command line."""

from __future__ import annotations

import argparse
import sys


def _quickstart(args: argparse.Namespace) -> None:
    from .quickstart import run_quickstart

    run_quickstart(
        args.out,
        n_per_class=args.n_per_class,
        num_inference_steps=args.steps,
        guidance_scale=args.guidance,
        seed=args.seed,
        timing_batch=args.timing_batch,
        timing_repeats=args.timing_repeats,
        routers=args.router,
        threshold=args.threshold,
    )


def _info(args: argparse.Namespace) -> None:
    from harmonica_kernels.info import report

    from . import __version__

    print(f"harmonica        {__version__}")
    print(report())


def _bench(args: argparse.Namespace) -> None:
    from .bench import load_results, render, update_readme

    payloads = load_results(args.results, suites=args.suite)
    print(render(payloads), end="")
    if args.readme:
        sections = update_readme(args.readme, payloads)
        print(f"\n{args.readme}: {sections} generated section(s) rewritten")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="harmonica", description="Learned feature caching for Diffusion Transformers"
    )
    sub = parser.add_subparsers(dest="command", required=True)

    q = sub.add_parser(
        "quickstart",
        help="sample the reference digits DiT uncached and cached; write a report with tables, images and plots",
    )
    q.add_argument("--out", default="harmonica-report", help="report folder (default: harmonica-report)")
    q.add_argument(
        "--n-per-class", type=int, default=10, help="samples per digit class for the quality metrics"
    )
    q.add_argument("--steps", type=int, default=20, help="DDIM steps")
    q.add_argument("--guidance", type=float, default=1.5, help="classifier-free guidance scale")
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--timing-batch", type=int, default=8, help="images per timed sampling run")
    q.add_argument("--timing-repeats", type=int, default=3, help="paired timing rounds per method")
    q.add_argument(
        "--router", action="append", default=[], help="a trained router file to compare (repeatable)"
    )
    q.add_argument("--threshold", type=float, default=0.1, help="router threshold τ")
    q.set_defaults(func=_quickstart)

    i = sub.add_parser("info", help="versions, built kernels and active backends")
    i.set_defaults(func=_info)

    b = sub.add_parser(
        "bench", help="render benchmark results (pytest benchmarks) as markdown tables, or into a README"
    )
    b.add_argument(
        "--results", default="benchmarks/results", help="folder of result JSON files (default: %(default)s)"
    )
    b.add_argument(
        "--readme", default=None, help="rewrite the <!-- harmonica-bench:begin --> sections of this file"
    )
    b.add_argument("--suite", action="append", default=None, help="only this suite (repeatable)")
    b.set_defaults(func=_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        args.func(args)
    except (ValueError, FileNotFoundError) as err:  # bad input: say what and how to fix, no traceback
        parser.exit(2, f"harmonica {args.command}: error: {err}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
