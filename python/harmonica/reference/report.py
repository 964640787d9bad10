"""Measure the reference model against the data (``python -m harmonica.reference.report``).

Samples ``n_per_class`` images of every digit (DDIM, CFG, fixed seed), then reports

- the classifier's accuracy on them (share recognised as the class asked for),
- the classifier-feature FID of the samples against the held-out test split, and the
  real-vs-real floor: a class-balanced subset of the train split, of the same size as the
  sample set, against the same test split (FID is biased at these counts, so only values at
  equal counts are comparable),

and optionally saves a grid of the samples (one row per class) as a PNG.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from typing import Any

import torch
from torch import nn

from .._images import tile
from ..eval import class_accuracy, classifier_fid
from ..sampling import sample
from . import load_classifier, load_dataset, load_model, load_scheduler
from .data import NUM_CLASSES

__all__ = ["class_balanced_subset", "evaluate_reference", "main", "save_grid"]


def class_balanced_subset(
    images: torch.Tensor, labels: torch.Tensor, n_per_class: int, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """``n_per_class`` random images of every class (seeded), in class order.

    Raises:
        ValueError: if a class has fewer than ``n_per_class`` images.
    """
    gen = torch.Generator().manual_seed(seed)
    keep = []
    for c in range(NUM_CLASSES):
        idx = (labels == c).nonzero().flatten()
        if len(idx) < n_per_class:
            raise ValueError(f"class {c} has {len(idx)} images, fewer than {n_per_class}")
        keep.append(idx[torch.randperm(len(idx), generator=gen)[:n_per_class]])
    index = torch.cat(keep)
    return images[index], labels[index]


def evaluate_reference(
    model: nn.Module,
    scheduler: Any,
    classifier: nn.Module,
    *,
    n_per_class: int = 50,
    num_inference_steps: int = 20,
    guidance_scale: float = 1.5,
    seed: int = 0,
    batch_size: int = 100,
) -> tuple[dict[str, float], torch.Tensor]:
    """Sample ``10 · n_per_class`` digits and score them against the data.

    The noise of all samples comes from one ``torch.Generator`` seeded with ``seed``, drawn
    once for the whole set (so the numbers do not depend on ``batch_size``).

    Returns:
        ``(metrics, samples)``: metrics as a dict of floats; samples float32
        ``[10 · n_per_class, 1, 16, 16]`` in [-1, 1], class-major (``n_per_class`` 0s, then 1s…).
    """
    labels = torch.arange(NUM_CLASSES).repeat_interleave(n_per_class)
    size, channels = model.config.sample_size, model.config.in_channels
    noise = torch.randn(len(labels), channels, size, size, generator=torch.Generator().manual_seed(seed))
    start = time.perf_counter()
    samples = torch.cat(
        [
            sample(
                model,
                scheduler,
                labels[i : i + batch_size],
                num_inference_steps=num_inference_steps,
                guidance_scale=guidance_scale,
                noise=noise[i : i + batch_size],
            )
            for i in range(0, len(labels), batch_size)
        ]
    )
    sampling_seconds = time.perf_counter() - start

    test_images, _ = load_dataset("test")
    train_images, train_labels = load_dataset("train")
    floor_images, _ = class_balanced_subset(train_images, train_labels, n_per_class, seed)
    metrics = {
        "num_samples": float(len(labels)),
        "num_inference_steps": float(num_inference_steps),
        "guidance_scale": guidance_scale,
        "seed": float(seed),
        "class_accuracy": class_accuracy(samples, labels, classifier).item(),
        "fid_samples_vs_test": classifier_fid(samples, test_images, classifier).item(),
        "fid_train_vs_test_floor": classifier_fid(floor_images, test_images, classifier).item(),
        "num_test_images": float(len(test_images)),
        "sampling_seconds": sampling_seconds,
    }
    return metrics, samples


def save_grid(samples: torch.Tensor, rows: int, path: str | os.PathLike[str], scale: int = 4) -> None:
    """Save ``samples`` ``[rows · cols, 1, H, W]`` in [-1, 1] as a grey PNG grid, 1 px gaps."""
    import matplotlib.pyplot as plt

    cols = samples.shape[0] // rows
    grid = tile(((samples[: rows * cols, :1].float() + 1) / 2).clamp(0, 1), cols, gap=1)[0]
    grid = grid.repeat_interleave(scale, 0).repeat_interleave(scale, 1)
    plt.imsave(os.fspath(path), grid.numpy(), cmap="gray", vmin=0.0, vmax=1.0)


def main(argv: list[str] | None = None) -> None:
    """Command-line entry point; ``--help`` lists the options."""
    p = argparse.ArgumentParser(
        prog="python -m harmonica.reference.report", description=__doc__.split("\n")[0]
    )
    p.add_argument("--model", default=None, help="model folder (default: the packaged reference model)")
    p.add_argument("--n-per-class", type=int, default=50)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--guidance", type=float, default=1.5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--grid", default=None, help="write a PNG grid of the first 10 samples per class here")
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    metrics, samples = evaluate_reference(
        load_model(args.model),
        load_scheduler(args.model),
        load_classifier(),
        n_per_class=args.n_per_class,
        num_inference_steps=args.steps,
        guidance_scale=args.guidance,
        seed=args.seed,
    )
    print(json.dumps(metrics, indent=2))
    if args.grid:
        per_class = min(10, args.n_per_class)
        shown = samples.view(NUM_CLASSES, args.n_per_class, *samples.shape[1:])[:, :per_class]
        save_grid(shown.reshape(-1, *samples.shape[1:]), NUM_CLASSES, args.grid)
        print(f"grid written to {args.grid}")


if __name__ == "__main__":
    main()
