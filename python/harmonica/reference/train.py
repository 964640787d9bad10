"""Train the reference DiT on the digits (``python -m harmonica.reference.train``).

The architecture, initialisation and schedule are in :mod:`harmonica.reference.model`.

What differs from calling the diffusers constructor and training naïvely (each fixes a trap):

- DiT's adaLN-Zero initialisation is applied by hand (:func:`init_dit_weights`): diffusers
  leaves every layer at PyTorch's default initialisation.
- Each ``BasicTransformerBlock`` owns a label embedder with its own label dropout, so in train
  mode the blocks would drop labels independently of each other. That dropout is disabled
  (:func:`disable_block_label_dropout`) and the label is replaced by the null id once per
  sample in the training loop instead.
- The noise schedule is cosine (``squaredcos_cap_v2``), which trains far better than linear at
  this budget; it is saved next to the weights as ``scheduler_config.json`` (a
  ``DDIMScheduler``) so samplers use the schedule the model was trained with.

Training: epsilon prediction, MSE, AdamW with linear warm-up, gradient clipping, an EMA of the
weights (the EMA is what gets saved), a tqdm bar with the running loss, everything seeded.
Checkpoints are written atomically every ``--ckpt-every`` steps to ``--ckpt-dir`` (outside the
output folder, so only the final weights end up there) and ``--resume`` continues from the
latest one, bit-for-bit the same run as without the interruption.

The output folder loads with ``DiTTransformer2DModel.from_pretrained(out)`` and
``DDIMScheduler.from_pretrained(out)``, exactly like a local DiT-XL/2 folder.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .data import NUM_CLASSES, load_dataset
from .model import BETA_SCHEDULE, NUM_TRAIN_TIMESTEPS, build_model, build_scheduler

__all__ = ["TrainConfig", "main", "train"]


@dataclass
class TrainConfig:
    """Hyper-parameters of one training run (all of them; saved in every checkpoint)."""

    steps: int = 3200
    batch: int = 64
    lr: float = 5e-4
    weight_decay: float = 0.0
    warmup_steps: int = 100
    grad_clip: float = 1.0
    label_drop_prob: float = 0.1
    ema_decay: float = 0.999
    seed: int = 0


def _atomic_torch_save(obj: Any, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _lr_at(step: int, cfg: TrainConfig) -> float:
    return cfg.lr * min(1.0, (step + 1) / max(1, cfg.warmup_steps))


def _batch_indices(step: int, n: int, batch: int, seed: int) -> torch.Tensor:
    """Indices of the batch at ``step``: epochs of seeded shuffles, a pure function of ``step``.

    Being stateless, it makes ``--resume`` see exactly the data order of an uninterrupted run.
    """
    per_epoch = n // batch
    epoch, pos = divmod(step, per_epoch)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
    return perm[pos * batch : (pos + 1) * batch]


def default_ckpt_dir(out: Path) -> Path:
    """Where checkpoints go unless ``--ckpt-dir`` says otherwise (a user cache, never ``out``)."""
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return cache / "harmonica" / "reference-train" / out.resolve().name


def train(
    out: str | os.PathLike[str],
    cfg: TrainConfig,
    *,
    ckpt_dir: str | os.PathLike[str] | None = None,
    ckpt_every: int = 200,
    resume: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Train the reference DiT and save it (EMA weights + scheduler config) to ``out``.

    Returns:
        A summary: final loss (mean of the last 100 steps), wall time, parameter count.
    """
    from diffusers import DDPMScheduler

    noise_sched = DDPMScheduler(num_train_timesteps=NUM_TRAIN_TIMESTEPS, beta_schedule=BETA_SCHEDULE)
    alphas_cumprod = noise_sched.alphas_cumprod.float()

    def loss_of(model: nn.Module, x0: torch.Tensor, y: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        b = x0.shape[0]
        t = torch.randint(0, NUM_TRAIN_TIMESTEPS, (b,), generator=gen)
        eps = torch.randn(x0.shape, generator=gen)
        drop = torch.rand(b, generator=gen) < cfg.label_drop_prob
        y = torch.where(drop, torch.full_like(y, NUM_CLASSES), y)
        a = alphas_cumprod[t].view(b, 1, 1, 1)
        xt = a.sqrt() * x0 + (1 - a).sqrt() * eps
        return F.mse_loss(model(xt, timestep=t, class_labels=y).sample, eps)

    out = Path(out)
    ema, losses, wall = train_loop(
        out, cfg, build_model(cfg.seed), loss_of, "train DiT", ckpt_dir, ckpt_every, resume, progress
    )
    ema.save_pretrained(out, safe_serialization=True)
    build_scheduler().save_config(out)
    return write_summary(
        out,
        cfg,
        ema,
        losses,
        wall,
        null_class_id=NUM_CLASSES,
        data="sklearn load_digits, train split (1437 images), bicubic 8->16, [-1, 1]",
    )


def train_loop(
    out: Path,
    cfg: TrainConfig,
    model: nn.Module,
    loss_of: Any,
    desc: str,
    ckpt_dir: str | os.PathLike[str] | None,
    ckpt_every: int,
    resume: bool,
    progress: bool,
) -> tuple[nn.Module, list[float], float]:
    """The loop both reference models train with: ``loss_of(model, x0, labels, generator)`` on the
    seeded batches of the digits' train split, AdamW with warm-up, clipping, an EMA, atomic
    checkpoints and bit-exact resume. Returns ``(ema in eval mode, losses, wall seconds)``."""
    from tqdm import tqdm

    ckpt_path = Path(ckpt_dir or default_ckpt_dir(out)) / "last.pt"
    ckpt_path.parent.mkdir(parents=True, exist_ok=True)
    images, labels = load_dataset("train")
    ema = copy.deepcopy(model).requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    gen = torch.Generator().manual_seed(cfg.seed)
    start, elapsed, losses = 0, 0.0, []

    if resume and ckpt_path.exists():
        state = torch.load(ckpt_path, map_location="cpu", weights_only=True)
        # Only the step count may change on resume (to extend a run); the rest must match.
        saved = {k: v for k, v in state["cfg"].items() if k != "steps"}
        wanted = {k: v for k, v in asdict(cfg).items() if k != "steps"}
        if saved != wanted:
            raise ValueError(
                f"checkpoint {ckpt_path} was written with {saved}, not {wanted}; "
                "pass the same settings or drop --resume"
            )
        model.load_state_dict(state["model"])
        ema.load_state_dict(state["ema"])
        opt.load_state_dict(state["opt"])
        gen.set_state(state["gen"])
        start, elapsed, losses = state["step"], state["elapsed"], state["losses"]
    elif resume:
        print(f"no checkpoint at {ckpt_path}; starting from scratch")

    model.train()
    t0 = time.perf_counter() - elapsed
    bar = tqdm(total=cfg.steps, initial=start, disable=not progress, mininterval=2.0, desc=desc)
    for step in range(start, cfg.steps):
        idx = _batch_indices(step, len(images), cfg.batch, cfg.seed)
        loss = loss_of(model, images[idx], labels[idx], gen)
        for group in opt.param_groups:
            group["lr"] = _lr_at(step, cfg)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        # Warm-up of the EMA decay so early averages are not dominated by the zero init.
        decay = min(cfg.ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            for pe, pm in zip(ema.parameters(), model.parameters(), strict=True):
                pe.lerp_(pm, 1 - decay)

        losses.append(loss.item())
        bar.update(1)
        bar.set_postfix(loss=f"{sum(losses[-100:]) / len(losses[-100:]):.4f}", refresh=False)
        done = step + 1
        if done % ckpt_every == 0 or done == cfg.steps:
            state = {
                "cfg": asdict(cfg),
                "step": done,
                "elapsed": time.perf_counter() - t0,
                "losses": losses,
                "model": model.state_dict(),
                "ema": ema.state_dict(),
                "opt": opt.state_dict(),
                "gen": gen.get_state(),
            }
            _atomic_torch_save(state, ckpt_path)
    bar.close()
    out.mkdir(parents=True, exist_ok=True)
    return ema.eval(), losses, time.perf_counter() - t0


def write_summary(
    out: Path, cfg: TrainConfig, ema: nn.Module, losses: list[float], wall: float, **extra: Any
) -> dict[str, Any]:
    """``out/training.json`` (atomically): the run's settings, final loss (mean of the last 100
    steps), wall time and parameter count, with ``extra``; returned."""
    summary = {
        "train_config": asdict(cfg),
        "steps_done": len(losses),
        "final_loss_last100": sum(losses[-100:]) / max(1, len(losses[-100:])),
        "wall_seconds": wall,
        "num_parameters": sum(p.numel() for p in ema.parameters()),
        "torch_threads": torch.get_num_threads(),
        **extra,
    }
    tmp = out / "training.json.tmp"
    tmp.write_text(json.dumps(summary, indent=2) + "\n")
    os.replace(tmp, out / "training.json")
    return summary


def main(argv: list[str] | None = None) -> None:
    """Command-line entry point; ``--help`` lists the options."""
    command_line(argv, "python -m harmonica.reference.train", __doc__, train)
    print(f"null class id for guidance = config.num_embeds_ada_norm = {NUM_CLASSES}")


def command_line(argv: list[str] | None, prog: str, doc: str, train_fn: Any) -> dict[str, Any]:
    """The training command of both reference models: parse ``argv``, run ``train_fn(out, cfg, ...)``,
    print its summary; returns it."""
    p = argparse.ArgumentParser(prog=prog, description=doc.split("\n")[0])
    p.add_argument("--out", required=True, help="output folder (from_pretrained-loadable)")
    defaults = TrainConfig()
    p.add_argument("--steps", type=int, default=defaults.steps)
    p.add_argument("--batch", type=int, default=defaults.batch)
    p.add_argument("--lr", type=float, default=defaults.lr)
    p.add_argument("--seed", type=int, default=defaults.seed)
    p.add_argument("--ema-decay", type=float, default=defaults.ema_decay)
    p.add_argument(
        "--ckpt-dir",
        default=None,
        help="checkpoint folder (default: ~/.cache/harmonica/reference-train/<out name>)",
    )
    p.add_argument("--ckpt-every", type=int, default=200)
    p.add_argument("--resume", action="store_true", help="continue from the checkpoint in --ckpt-dir")
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    args = p.parse_args(argv)
    if args.steps < 1 or args.batch < 1:
        p.error("--steps and --batch must be positive")

    torch.set_num_threads(args.threads)
    cfg = TrainConfig(
        steps=args.steps, batch=args.batch, lr=args.lr, seed=args.seed, ema_decay=args.ema_decay
    )
    summary = train_fn(args.out, cfg, ckpt_dir=args.ckpt_dir, ckpt_every=args.ckpt_every, resume=args.resume)
    print(json.dumps(summary, indent=2))
    print(f"wall time {summary['wall_seconds'] / 60:.1f} min, final loss {summary['final_loss_last100']:.4f}")
    return summary


if __name__ == "__main__":
    main()
