"""The ``harmonica`` command line."""

from __future__ import annotations

import argparse
import sys
from typing import Any


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
        peers=not args.no_peers,
        **({} if args.train_iterations is None else {"train_iterations": args.train_iterations}),
    )


def _train(args: argparse.Namespace) -> None:
    from ._checks import check_output_file

    # Before the model loads or anything trains: a router that cannot be written is lost work.
    check_output_file(args.out, "--out")
    if args.checkpoint_dir is not None:
        from ._checks import check_output_dir

        check_output_dir(args.checkpoint_dir, "--checkpoint-dir")
    device = _device(args.device)

    import torch

    from .training import train_router

    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, _DTYPES[args.dtype])
    transformer, scheduler = _load_model(args.model, dtype=dtype, device=device)
    result = train_router(
        transformer,
        scheduler,
        num_steps=args.steps,
        method=args.method,
        iterations=args.iterations,
        batch_size=args.batch,
        guidance_scale=args.guidance,
        lr=args.lr,
        beta=args.beta,
        target_cur=args.target_cur,
        lambda_every=args.lambda_every,
        lambda_variant=args.lambda_variant,
        lambda_batch_size=args.lambda_batch,
        lambda_on=args.lambda_on,
        **(
            dict(straight_through=False, max_age=None, tie_steps=False, forecast_order=0, exchanges=0)
            if args.published
            else dict(
                straight_through=args.straight_through,
                max_age=args.max_age,
                tie_steps=args.tie_steps,
                gradient_at=args.gradient_at,
                forecast_order=args.forecast_order,
                exchanges=args.exchanges,
            )
        ),
        fit_coefficients=args.fit,
        write_threshold=args.write_threshold,
        threshold=args.tau,
        seed=args.seed,
        data=args.data,
        checkpoint_dir=args.checkpoint_dir,
        resume=not args.no_resume,
        **_conditions(args, transformer),
    )
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0:
        result.router.save(args.out)
        settings = result.router.training_settings
        print(
            f"router for {args.steps} steps written to {args.out}: cache usage ratio {settings['cur']:.1%} "
            f"at τ = {args.tau}, {result.iterations} iterations in {result.seconds:.0f} s"
        )


def _conditions(args: argparse.Namespace, transformer: Any) -> dict:
    """``--prompt-embeds`` and ``--latent-size`` as keyword arguments of train/search/fit."""
    if args.latent_size is not None:
        from .compare import is_flow_family

        if not is_flow_family(transformer):
            raise ValueError(
                f"--latent-size applies to the flow-matching families (FLUX, SD3, Wan, Qwen-Image); "
                f"{type(transformer).__name__} samples at its sample_size"
            )
    return {**_prompt_pool(args.prompt_embeds), "latent_size": args.latent_size}


def _prompt_pool(path: str | None) -> dict:
    """``--prompt-embeds``: the PixArt prompt pool's tensors (none without a path)."""
    if not path:
        return {}
    from safetensors.torch import load_file

    prompts = load_file(path)
    if "prompt_embeds" not in prompts:
        raise ValueError(f"{path} has no tensor named 'prompt_embeds'")
    return {k: v for k, v in prompts.items() if k.endswith(("prompt_embeds", "attention_mask"))}


def _search(args: argparse.Namespace) -> None:
    from ._checks import check_output_file

    check_output_file(args.out, "--out")
    device = _device(args.device)

    import torch

    from .router import Router
    from .search import search_schedule

    if args.threads:
        torch.set_num_threads(args.threads)
    transformer, scheduler = _load_model(args.model, dtype=getattr(torch, _DTYPES[args.dtype]), device=device)
    start = Router.load(args.start, model=transformer) if args.start else None
    result = search_schedule(
        transformer,
        scheduler,
        num_steps=args.steps,
        target_cur=args.target_cur,
        start=start,
        max_age=args.max_age,
        forecast_order=args.forecast_order,
        rounds=args.rounds,
        exchanges=args.exchanges,
        batch_size=args.batch,
        guidance_scale=args.guidance,
        seed=args.seed,
        **_conditions(args, transformer),
    )
    result.router.save(args.out)
    print(
        f"schedule for {args.steps} steps written to {args.out}: cache usage ratio "
        f"{result.schedule.cache_usage_ratio:.1%}, {result.forwards} sampling forwards "
        f"in {result.seconds:.0f} s"
    )


def _fit(args: argparse.Namespace) -> None:
    from ._checks import check_output_file

    check_output_file(args.out, "--out")
    device = _device(args.device)

    import torch

    from .forecast import fit_forecast
    from .models import units
    from .router import Router
    from .schedule import CacheSchedule
    from .search import schedule_router

    if args.threads:
        torch.set_num_threads(args.threads)
    transformer, scheduler = _load_model(args.model, dtype=getattr(torch, _DTYPES[args.dtype]), device=device)
    if args.router:
        router = Router.load(args.router, model=transformer)
        wrong = router.steps_mismatch(args.steps)
        if wrong is not None:
            raise ValueError(f"--router {args.router} {wrong}")
        schedule = router.to_schedule(args.threshold).with_forecast(args.order)
    elif args.even is not None:
        schedule = CacheSchedule.even_steps(
            args.steps, len(units(transformer)), args.even, warmup=args.warmup
        ).with_forecast(args.order)
    else:
        schedule = CacheSchedule.fora(args.steps, len(units(transformer)), args.fora, order=args.order)
    fit = fit_forecast(
        transformer,
        scheduler,
        schedule,
        batch_size=args.batch,
        guidance_scale=args.guidance,
        seed=args.seed,
        **_conditions(args, transformer),
    )
    settings = {"method": "fit_forecast", "order": args.order, "batch_size": args.batch, "seed": args.seed}
    if args.router:
        settings["router"] = str(args.router)
    elif args.even is not None:
        settings.update(even_steps=args.even, warmup=args.warmup)
    else:
        settings["fora"] = args.fora
    schedule_router(transformer, fit.schedule, scheduler, settings).save(args.out)
    print(
        f"forecast schedule for {args.steps} steps written to {args.out}: cache usage ratio "
        f"{fit.schedule.cache_usage_ratio:.1%}; the fitted forecasts' squared error is "
        f"{fit.mean_error_ratio:.0%} of the step-distance rule's on the fit batch ({fit.seconds:.0f} s)"
    )


def _label_and_path(item: str) -> tuple[str, str]:
    """``[LABEL=]PATH`` of ``--router``: the whole item when it is a file, else split at the ``=``
    after which a file exists (a label may hold ``=`` itself, e.g. ``N=2``), else at the first ``=``;
    without a label, the file name."""
    import os

    if os.path.exists(item) or "=" not in item:
        return os.path.splitext(os.path.basename(item))[0], item
    cuts = [i for i, char in enumerate(item) if char == "="]
    cut = next((i for i in cuts if os.path.exists(item[i + 1 :])), cuts[0])
    return item[:cut], item[cut + 1 :]


def _compare(args: argparse.Namespace) -> None:

    import torch

    from .compare import DEFAULT_SWEEP, OPTIONAL_SWEEP, compare

    if args.threads:
        torch.set_num_threads(args.threads)
    known = {**DEFAULT_SWEEP, **OPTIONAL_SWEEP}
    families = list(DEFAULT_SWEEP)
    if args.methods is not None:
        families = [f.strip() for f in args.methods.split(",") if f.strip()]
    unknown = [f for f in families if f not in known and f != "router"]
    if unknown:
        raise ValueError(
            f"--methods: unknown family {unknown}; choose from {', '.join(known)} "
            "(routers come from --router)"
        )
    sweep = {f: list(known[f]) for f in families if f in known}
    for item in args.sweep:
        family, sep, values = item.partition("=")
        if not sep or not values.strip():
            raise ValueError(f"--sweep {item!r}: expected FAMILY=V1,V2,... (e.g. --sweep fbcache=0.05,0.1)")
        sweep[family.strip()] = [v for v in values.split(",") if v.strip()]
    routers: dict[str, str] = {}
    for item in [path for group in args.router for path in group]:
        label, path = _label_and_path(item)
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
        latent_size=args.latent_size,
        batch_size=args.batch_size,
        timing_repeats=args.timing_repeats,
        seed=args.seed,
        out_dir=args.out,
        progress=not args.no_progress,
    )


def _class_ids(text: str) -> list[int]:
    try:
        ids = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        ids = []
    if not ids:
        raise ValueError(f"--labels {text!r}: expected comma-separated class ids such as 0,3,7")
    return ids


def _sample(args: argparse.Namespace) -> None:
    import torch

    from .models import UnsupportedModelError
    from .sample_cli import load_prompt_embeds, sample_images

    if args.threshold is not None and args.router is None:
        raise ValueError("--threshold is the router's τ: it needs --router PATH")
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        _, result = sample_images(
            args.model,
            router=args.router,
            **({} if args.threshold is None else {"threshold": args.threshold}),
            fora=args.fora,
            order=args.order,
            forecast_times=args.forecast_times,
            num_inference_steps=args.steps,
            guidance_scale=args.guidance,
            class_labels=None if args.labels is None else _class_ids(args.labels),
            prompt_embeds=load_prompt_embeds(args.prompt_embeds) if args.prompt_embeds else None,
            latent_size=args.latent_size,
            num_images=args.num,
            seed=args.seed,
            batch_size=args.batch_size,
            compare_uncached=args.compare_uncached,
            out=args.out,
            save_tensor=args.save_tensor,
            device=_device(args.device),
            dtype=getattr(torch, _DTYPES[args.dtype]),
            progress=not args.no_progress,
        )
    except UnsupportedModelError as err:  # a TypeError: the model cannot be cached, say so cleanly
        raise ValueError(str(err)) from err
    print(result.summary())


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
        sections = update_readme(args.readme, payloads, suites=args.suite)
        print(f"\n{args.readme}: {sections} generated section(s) rewritten")


_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
"""``--dtype`` choices: names of torch dtypes."""


def _load_model(path: Any, *, dtype: Any, device: str) -> tuple[Any, Any]:
    """``--model``: a local model folder (:func:`harmonica.models.load_local`), or without one the
    packaged reference digits DiT (the CLI's default; the engine never loads it by itself)."""
    if path is None:
        from .reference import load_model, load_scheduler

        return load_model(dtype=dtype).to(device), load_scheduler()
    from . import models

    return models.load_local(path, dtype=dtype, device=device)


def _device(name: str | None) -> str:
    """``--device``: the default (CUDA when this torch has it, else CPU), or a checked device name."""
    import torch

    if name is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise ValueError(f"--device {name!r} is not a device name ({err}); use cpu or cuda[:N]") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            why = "is a CPU-only build" if torch.version.cuda is None else "sees no usable GPU"
            raise ValueError(f"--device {name}: this torch ({torch.__version__}) {why}; use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) visible")
    return name


def _max_age(text: str) -> int | str | None:
    """``--max-age``: a step count >= 1, 'none' (no cap) or, for train, 'auto' (train_router's default)."""
    if text.strip().lower() in ("none", "auto"):
        return None if text.strip().lower() == "none" else "auto"
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: give an age in steps >= 1, or 'none'")
    return value


def _threads(text: str) -> int:
    """``--threads``: 0 (torch's default) or a positive count."""
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r}: give a thread count >= 1, or 0 for torch's default")
    return value


def _add_conditions(parser: argparse.ArgumentParser) -> None:
    """``--prompt-embeds`` and ``--latent-size`` of train, search and fit (see :func:`_conditions`)."""
    parser.add_argument(
        "--prompt-embeds",
        default=None,
        help="PixArt, FLUX, SD3, Wan, Qwen-Image: safetensors with prompt_embeds [P, L, C] (and "
        "pooled_prompt_embeds [P, D] for FLUX.1 / SD3)",
    )
    parser.add_argument(
        "--latent-size",
        type=int,
        default=None,
        help="FLUX, SD3, Wan, Qwen-Image: image tokens per side (default: SD3's native size, else 32)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="harmonica", description="Learned feature caching for Diffusion Transformers"
    )
    sub = parser.add_subparsers(dest="command", required=True)

    q = sub.add_parser(
        "quickstart",
        help="sample the reference digits DiT uncached and cached; write a report with tables, images, plots",
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
    q.add_argument("--no-peers", action="store_true", help="skip the comparison with the training-free peers")
    q.add_argument(
        "--train-iterations",
        type=int,
        default=None,
        help="iterations of the router trained by the quickstart (0: train none; default 200, ~2 min)",
    )
    q.set_defaults(func=_quickstart)

    t = sub.add_parser(
        "train",
        help="train a router (SDT + IEPO, or L2C) for a model and step count; runs under torchrun too",
    )
    t.add_argument("--model", default=None, help="local transformer or pipeline folder (default: reference)")
    t.add_argument("--method", choices=["harmonica", "l2c"], default="harmonica")
    t.add_argument("--steps", type=int, default=20, help="sampling steps T the router is for")
    t.add_argument("--iterations", type=int, default=1000, help="trained denoising steps (default 1000)")
    t.add_argument("--batch", type=int, default=16, help="global noise samples per iteration (CFG doubles)")
    t.add_argument("--guidance", type=float, default=1.5, help="classifier-free guidance scale")
    t.add_argument("--lr", type=float, default=None, help="AdamW lr (default: scaled to the run's length)")
    t.add_argument("--beta", type=float, default=None, help="fixed weight of Σ r (the paper's mode)")
    t.add_argument(
        "--target-cur",
        type=float,
        default=None,
        help="budget mode: this cache usage (default 0.35 without --beta)",
    )
    t.add_argument("--lambda-every", type=int, default=500, help="C: iterations between λ refreshes")
    t.add_argument("--lambda-variant", choices=["marginal", "leave_one_out", "none"], default="marginal")
    t.add_argument(
        "--lambda-on",
        choices=["soft", "hard"],
        default="soft",
        help="measure λ on the soft router or hard schedule",
    )
    t.add_argument(
        "--straight-through",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="train on the hard forward with the soft gradient (default: on; L2C off)",
    )
    t.add_argument(
        "--max-age",
        type=_max_age,
        default="auto",
        help="cap on the age of a reused cache entry in steps, or 'none' (default: 2; L2C none)",
    )
    t.add_argument(
        "--tie-steps",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="one logit per step: reuse whole steps (default: on; L2C off)",
    )
    t.add_argument(
        "--published",
        action="store_true",
        help="the paper's method: no straight-through, no age cap, a logit per unit, plain reuse",
    )
    t.add_argument(
        "--gradient-at",
        choices=["reuse", "hard"],
        default="reuse",
        help="straight-through: take a row's gradient where it is reused (default) or at its hard decision",
    )
    t.add_argument(
        "--forecast-order",
        type=int,
        choices=[0, 1, 2],
        default=None,
        help="train with reused units forecast at this order, 0: plain reuse (default: 2; L2C 0)",
    )
    t.add_argument(
        "--fit",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="with --forecast-order: fit the forecast coefficients after training (default: on)",
    )
    t.add_argument(
        "--exchanges",
        type=int,
        default=None,
        help="passes of whole-step exchanges on the final image after training (default: 3; L2C 0)",
    )
    t.add_argument("--lambda-batch", type=int, default=None, help="noise samples per λ estimate")
    t.add_argument("--tau", type=float, default=0.1, help="inference threshold τ of the router")
    t.add_argument("--write-threshold", type=float, default=0.1, help="cache-write threshold on r")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--data", default=None, help="L2C: real samples (.safetensors/.pt or image folder)")
    _add_conditions(t)
    t.add_argument("--dtype", choices=list(_DTYPES), default="fp32")
    t.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda if available)")
    t.add_argument("--threads", type=_threads, default=0, help="torch CPU threads (0: torch's default)")
    t.add_argument("--checkpoint-dir", default=None, help="resumable training state (resumed when present)")
    t.add_argument("--no-resume", action="store_true", help="ignore an existing checkpoint")
    t.add_argument("--out", default="router.safetensors", help="router file to write")
    t.set_defaults(func=_train)

    r = sub.add_parser(
        "search",
        help="search a cache schedule on final-image errors at a target usage (or polish a router to it)",
    )
    r.add_argument("--model", default=None, help="local transformer or pipeline folder (default: reference)")
    r.add_argument("--steps", type=int, default=20, help="sampling steps T the schedule is for")
    r.add_argument("--target-cur", type=float, required=True, help="cache usage ratio to reach, in (0, 1)")
    r.add_argument("--start", default=None, help="a trained router file to polish to the target")
    r.add_argument(
        "--max-age",
        type=_max_age,
        default=None,
        help="cap on the age of a reused cache entry in steps, or 'none'",
    )
    r.add_argument(
        "--forecast-order",
        type=int,
        choices=(0, 1, 2),
        default=0,
        help="forecast reused entries at this order while searching, then fit the coefficients (0: reuse)",
    )
    r.add_argument("--rounds", type=int, default=4, help="cost measurements on the way to the target")
    r.add_argument(
        "--exchanges", type=int, default=0, help="passes of whole-step exchanges at each target (default: 0)"
    )
    r.add_argument(
        "--batch",
        type=int,
        default=None,
        help="noise samples the errors are measured on (default: 8, 16 with --exchanges)",
    )
    r.add_argument("--guidance", type=float, default=1.5, help="classifier-free guidance scale")
    r.add_argument("--seed", type=int, default=0)
    _add_conditions(r)
    r.add_argument("--dtype", choices=list(_DTYPES), default="fp32")
    r.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda if available)")
    r.add_argument("--threads", type=_threads, default=0, help="torch CPU threads (0: torch's default)")
    r.add_argument("--out", default="schedule.safetensors", help="router file holding the schedule")
    r.set_defaults(func=_search)

    f = sub.add_parser(
        "fit",
        help="fit forecast coefficients for FORA N (or a router's schedule) on the model's own run",
    )
    f.add_argument("--model", default=None, help="local transformer or pipeline folder (default: reference)")
    f.add_argument("--steps", type=int, default=20, help="sampling steps T the schedule is for")
    source = f.add_mutually_exclusive_group(required=True)
    source.add_argument("--fora", type=int, metavar="N", help="FORA interval N, forecasting's static form")
    source.add_argument("--router", default=None, help="a router file whose schedule to forecast")
    source.add_argument(
        "--even",
        type=float,
        metavar="USAGE",
        help="whole steps reused at this cache usage, spread evenly after the warm-up",
    )
    f.add_argument("--warmup", type=int, default=3, help="--even: computed first steps (3: TaylorSeer's)")
    f.add_argument("--threshold", type=float, default=0.1, help="the router's τ")
    f.add_argument("--order", type=int, choices=(1, 2), default=2, help="forecast order")
    f.add_argument("--batch", type=int, default=16, help="noise samples the fit sees")
    f.add_argument("--guidance", type=float, default=1.5, help="classifier-free guidance scale")
    f.add_argument("--seed", type=int, default=0)
    _add_conditions(f)
    f.add_argument("--dtype", choices=list(_DTYPES), default="fp32")
    f.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda if available)")
    f.add_argument("--threads", type=_threads, default=0, help="torch CPU threads (0: torch's default)")
    f.add_argument("--out", default="forecast.safetensors", help="router file holding the fitted schedule")
    f.set_defaults(func=_fit)

    c = sub.add_parser(
        "compare",
        help="sweep caching methods (FORA, routers, diffusers/cache-dit peers); speedup vs quality report",
    )
    c.add_argument("--model", default=None, help="local pipeline or transformer folder (default: reference)")
    c.add_argument(
        "--methods",
        default=None,
        help="comma-separated families to sweep (default: all of fora, forecast, fitted, fbcache, "
        "taylorseer, magcache, pab, dbcache; also step / lsnr: forecast with the rule in step index / "
        "the sampler's log-SNR alone)",
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
    c.add_argument(
        "--num-samples", type=int, default=None, help="another DiT, or flow models: evaluation samples"
    )
    c.add_argument(
        "--prompt-embeds",
        default=None,
        help="PixArt, FLUX, SD3, Wan, Qwen-Image: safetensors with prompt_embeds [N, L, C] (and optionally "
        "pooled_prompt_embeds [N, D], negative_prompt_embeds, negative_pooled_prompt_embeds)",
    )
    c.add_argument(
        "--latent-size",
        type=int,
        default=None,
        help="FLUX, SD3, Wan, Qwen-Image: image tokens per side (default: SD3's native size, else 32)",
    )
    c.add_argument("--batch-size", type=int, default=10, help="images per sampling call and timed batch")
    c.add_argument("--timing-repeats", type=int, default=3, help="paired timing rounds per method")
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--threads", type=_threads, default=0, help="torch CPU threads (0: torch's default)")
    c.add_argument("--out", default="harmonica-compare", help="report folder (default: harmonica-compare)")
    c.add_argument("--no-progress", action="store_true", help="no progress bars")
    c.set_defaults(func=_compare)

    s = sub.add_parser(
        "sample",
        help="sample images (uncached, a router or FORA) as a PNG grid; optionally PSNR, speedup vs uncached",
    )
    s.add_argument("--model", default=None, help="local pipeline or transformer folder (default: reference)")
    cache = s.add_mutually_exclusive_group()
    cache.add_argument("--router", default=None, metavar="PATH", help="a trained router file for this model")
    cache.add_argument(
        "--fora", type=int, default=None, metavar="N", help="FORA: compute every N-th step (N >= 2)"
    )
    cache.add_argument("--uncached", action="store_true", help="no caching (the default)")
    s.add_argument(
        "--order", type=int, choices=(0, 1, 2), default=0, help="with --fora: forecast skipped steps (1, 2)"
    )
    s.add_argument(
        "--forecast-times",
        # schedule.FORECAST_TIMES, written out: importing it would load torch for --help
        choices=("blend", "step", "log-snr"),
        default="blend",
        help="with --order: the forecast rule's step distances in step index, the sampler's log-SNR, or "
        "the mean of both forecasts (blend, default)",
    )
    s.add_argument("--threshold", type=float, default=None, help="router threshold τ (default 0.1)")
    s.add_argument("--steps", type=int, default=20, help="sampling steps (a router's must match)")
    s.add_argument("--guidance", type=float, default=1.5, help="classifier-free guidance scale")
    s.add_argument(
        "--labels",
        default=None,
        metavar="IDS",
        help="DiT class ids, e.g. 0,3,7 (default: reference 0..9; another DiT: --num (8) random ids)",
    )
    s.add_argument(
        "--prompt-embeds",
        default=None,
        help="PixArt, FLUX, SD3, Wan, Qwen-Image: safetensors with prompt_embeds [N, L, C] (and optionally "
        "pooled_prompt_embeds [N, D], negative_prompt_embeds, negative_pooled_prompt_embeds)",
    )
    s.add_argument(
        "--latent-size",
        type=int,
        default=None,
        help="FLUX, SD3, Wan, Qwen-Image: image tokens per side (default: SD3's native size, else 32)",
    )
    s.add_argument("--num", type=int, default=None, help="images when --labels is not given (cycles prompts)")
    s.add_argument("--seed", type=int, default=0, help="seed of the initial noise")
    s.add_argument("--batch-size", type=int, default=10, help="images per sampling call")
    s.add_argument("--threads", type=_threads, default=0, help="torch CPU threads (0: torch's default)")
    s.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda if available)")
    s.add_argument("--dtype", choices=list(_DTYPES), default="fp32", help="the transformer's dtype")
    s.add_argument("--out", default="samples.png", help="PNG image grid (default: samples.png)")
    s.add_argument(
        "--save-tensor", default=None, metavar="FILE", help="also save the raw samples (.safetensors)"
    )
    s.add_argument(
        "--compare-uncached",
        action="store_true",
        help="also sample uncached from the same noise: grid above the cached one, PSNR, measured speedup",
    )
    s.add_argument("--no-progress", action="store_true", help="no progress bar")
    s.set_defaults(func=_sample)

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
