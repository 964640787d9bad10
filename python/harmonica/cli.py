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


def _compare(args: argparse.Namespace) -> None:
    import os

    import torch

    from .compare import DEFAULT_SWEEP, compare

    if args.threads:
        torch.set_num_threads(args.threads)
    families = list(DEFAULT_SWEEP)
    if args.methods is not None:
        families = [f.strip() for f in args.methods.split(",") if f.strip()]
    unknown = [f for f in families if f not in DEFAULT_SWEEP and f != "router"]
    if unknown:
        raise ValueError(
            f"--methods: unknown family {unknown}; choose from {', '.join(DEFAULT_SWEEP)} "
            "(routers come from --router)"
        )
    sweep = {f: list(DEFAULT_SWEEP[f]) for f in families if f in DEFAULT_SWEEP}
    for item in args.sweep:
        family, sep, values = item.partition("=")
        if not sep or not values.strip():
            raise ValueError(f"--sweep {item!r}: expected FAMILY=V1,V2,... (e.g. --sweep fbcache=0.05,0.1)")
        sweep[family.strip()] = [v for v in values.split(",") if v.strip()]
    routers: dict[str, str] = {}
    for item in [path for group in args.router for path in group]:
        label, sep, path = item.partition("=")
        if not sep or os.path.exists(item):
            label, path = os.path.splitext(os.path.basename(item))[0], item
        routers[label] = path
    prompt_embeds = None
    if args.prompt_embeds:
        from safetensors.torch import load_file

        prompt_embeds = load_file(args.prompt_embeds)
    compare(
        args.model,
        methods=sweep,
        routers=routers,
        router_thresholds=args.threshold or [0.1],
        num_inference_steps=args.steps,
        guidance_scale=args.guidance,
        n_per_class=args.n_per_class,
        num_samples=args.num_samples,
        prompt_embeds=prompt_embeds,
        batch_size=args.batch_size,
        timing_repeats=args.timing_repeats,
        seed=args.seed,
        out_dir=args.out,
        progress=not args.no_progress,
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

    c = sub.add_parser(
        "compare",
        help="sweep caching methods (FORA, routers, diffusers/cache-dit peers); speedup vs quality report",
    )
    c.add_argument("--model", default=None, help="local pipeline or transformer folder (default: reference)")
    c.add_argument(
        "--methods",
        default=None,
        help="comma-separated families to sweep (default: fora,fbcache,taylorseer,magcache,pab,dbcache)",
    )
    c.add_argument(
        "--sweep",
        action="append",
        default=[],
        metavar="FAMILY=V1,V2",
        help="strengths of one family, e.g. fora=2,3 or magcache=0.12,0.24:5 (repeatable)",
    )
    c.add_argument(
        "--router",
        action="append",
        nargs="+",
        default=[],
        metavar="[LABEL=]PATH",
        help="router files (repeatable; the label defaults to the file name)",
    )
    c.add_argument("--threshold", type=float, action="append", default=[], help="router τ (repeatable; 0.1)")
    c.add_argument("--steps", type=int, default=20, help="sampling steps")
    c.add_argument("--guidance", type=float, default=1.5, help="classifier-free guidance scale")
    c.add_argument("--n-per-class", type=int, default=10, help="reference model: samples per digit")
    c.add_argument("--num-samples", type=int, default=None, help="another DiT: evaluation samples")
    c.add_argument("--prompt-embeds", default=None, help="PixArt: safetensors with prompt_embeds [N, L, C]")
    c.add_argument("--batch-size", type=int, default=10, help="images per sampling call and timed batch")
    c.add_argument("--timing-repeats", type=int, default=3, help="paired timing rounds per method")
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    c.add_argument("--out", default="harmonica-compare", help="report folder (default: harmonica-compare)")
    c.add_argument("--no-progress", action="store_true", help="no progress bars")
    c.set_defaults(func=_compare)

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
