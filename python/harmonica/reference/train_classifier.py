"""Train the metric classifier (``python -m harmonica.reference.train_classifier --out DIR``).

Trained on the train split with ±1-pixel random shifts (so it tolerates samples that are not
centred exactly like the data), AdamW with a one-cycle schedule, seeded; the held-out (test
split) accuracy is stored in the saved ``config.json``.
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.nn.functional as F

from .classifier import DigitsClassifier, evaluate_accuracy
from .data import load_dataset

__all__ = ["main", "train_classifier"]


def _random_shift(x: torch.Tensor, generator: torch.Generator, max_shift: int = 1) -> torch.Tensor:
    """Shift each image by up to ``max_shift`` pixels in x and y, filling with background (-1)."""
    b, _, h, w = x.shape
    padded = F.pad(x, (max_shift,) * 4, value=-1.0)
    dy = torch.randint(0, 2 * max_shift + 1, (b,), generator=generator)
    dx = torch.randint(0, 2 * max_shift + 1, (b,), generator=generator)
    rows = (dy[:, None] + torch.arange(h)[None]).view(b, 1, h, 1).expand(b, 1, h, w + 2 * max_shift)
    out = padded.gather(2, rows)
    cols = (dx[:, None] + torch.arange(w)[None]).view(b, 1, 1, w).expand(b, 1, h, w)
    return out.gather(3, cols)


def train_classifier(
    out: str | os.PathLike[str] | None = None,
    *,
    epochs: int = 40,
    batch: int = 64,
    lr: float = 2e-3,
    seed: int = 0,
    progress: bool = True,
) -> tuple[DigitsClassifier, float]:
    """Train the metric classifier on the train split; save it to ``out`` if given.

    Returns:
        ``(model in eval mode, accuracy on the held-out test split)``.
    """
    from tqdm import tqdm

    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    x_train, y_train = load_dataset("train")
    x_test, y_test = load_dataset("test")
    model = DigitsClassifier()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    steps_per_epoch = (len(x_train) + batch - 1) // batch
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=epochs * steps_per_epoch)
    model.train()
    bar = tqdm(range(epochs), disable=not progress, desc="train classifier")
    for _ in bar:
        perm = torch.randperm(len(x_train), generator=gen)
        for i in range(0, len(x_train), batch):
            idx = perm[i : i + batch]
            loss = F.cross_entropy(model(_random_shift(x_train[idx], gen)), y_train[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        bar.set_postfix(loss=f"{loss.item():.4f}")
    model.eval()
    test_acc = evaluate_accuracy(model, x_test, y_test)
    if out is not None:
        model.save(out, test_accuracy=test_acc, epochs=epochs, batch=batch, lr=lr, seed=seed)
    return model, test_acc


def main(argv: list[str] | None = None) -> None:
    """Command-line entry point; ``--help`` lists the options."""
    p = argparse.ArgumentParser(
        prog="python -m harmonica.reference.train_classifier", description="Train the metric classifier."
    )
    p.add_argument("--out", required=True, help="output folder (model.safetensors + config.json)")
    p.add_argument("--epochs", type=int, default=40)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    _, acc = train_classifier(args.out, epochs=args.epochs, seed=args.seed)
    print(f"held-out (test split) accuracy: {acc:.4f}")


if __name__ == "__main__":
    main()
