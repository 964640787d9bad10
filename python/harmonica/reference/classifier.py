"""The metric classifier: a small CNN on the 16×16 reference digits.

It serves two metrics in :mod:`harmonica.eval`: the class accuracy of class-conditional samples
and the classifier-feature FID (no Inception weights can be fetched here, and Inception features
of 16×16 digits would mean little anyway). FID features are the penultimate layer *before* its
ReLU: after the ReLU some units are dead on the whole data set, which makes the covariance
singular and the Fréchet distance ill-conditioned.

Trained on the train split with ±1-pixel random shifts (so it tolerates samples that are not
centred exactly like the data); its held-out accuracy is stored in the saved config.
"""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .data import IMAGE_SIZE, NUM_CLASSES, load_dataset

__all__ = ["ClassifierConfig", "DigitsClassifier", "evaluate_accuracy", "main", "train_classifier"]

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"


@dataclass
class ClassifierConfig:
    """Architecture of :class:`DigitsClassifier` (saved as ``config.json`` next to the weights)."""

    image_size: int = IMAGE_SIZE
    in_channels: int = 1
    num_classes: int = NUM_CLASSES
    width: int = 32
    feature_dim: int = 64


class DigitsClassifier(nn.Module):
    """CNN for ``[B, 1, 16, 16]`` digits in [-1, 1].

    Two conv stages (``width`` and ``2 * width`` channels, two 3×3 convs each, 2×2 max-pool),
    a linear layer to ``feature_dim`` features, ReLU, dropout, and a linear head to the logits.
    """

    def __init__(self, config: ClassifierConfig | None = None) -> None:
        super().__init__()
        self.config = config or ClassifierConfig()
        c, w = self.config.in_channels, self.config.width
        self.conv = nn.Sequential(
            nn.Conv2d(c, w, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(w, w, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(w, 2 * w, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(2 * w, 2 * w, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
        )
        pooled = self.config.image_size // 4
        self.fc = nn.Linear(2 * w * pooled * pooled, self.config.feature_dim)
        self.dropout = nn.Dropout(0.3)
        self.head = nn.Linear(self.config.feature_dim, self.config.num_classes)

    def _check(self, x: torch.Tensor) -> None:
        cfg = self.config
        expected = (cfg.in_channels, cfg.image_size, cfg.image_size)
        if x.dim() != 4 or tuple(x.shape[1:]) != expected:
            raise ValueError(f"expected images [B, {', '.join(map(str, expected))}], got {tuple(x.shape)}")
        if not x.is_floating_point():
            raise ValueError(f"expected floating-point images in [-1, 1], got {x.dtype}")

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate-layer activations before the ReLU: float ``[B, feature_dim]`` (for FID)."""
        self._check(x)
        return self.fc(self.conv(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits: float ``[B, num_classes]`` for images ``[B, 1, 16, 16]`` in [-1, 1]."""
        return self.head(self.dropout(F.relu(self.features(x))))

    def save(self, directory: str | os.PathLike[str], **metadata: object) -> None:
        """Write ``model.safetensors`` and ``config.json`` (the architecture plus ``metadata``)."""
        from safetensors.torch import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().contiguous() for k, v in self.state_dict().items()}
        tmp = directory / (WEIGHTS_NAME + ".tmp")
        save_file(state, str(tmp))
        os.replace(tmp, directory / WEIGHTS_NAME)
        tmp = directory / (CONFIG_NAME + ".tmp")
        tmp.write_text(json.dumps({**asdict(self.config), **metadata}, indent=2) + "\n")
        os.replace(tmp, directory / CONFIG_NAME)

    @classmethod
    def load(cls, directory: str | os.PathLike[str]) -> DigitsClassifier:
        """Load a classifier written by :meth:`save`; returned in eval mode, float32, CPU."""
        from safetensors.torch import load_file

        directory = Path(directory)
        weights, config_path = directory / WEIGHTS_NAME, directory / CONFIG_NAME
        if not weights.is_file() or not config_path.is_file():
            raise FileNotFoundError(
                f"no classifier in {directory} (need {WEIGHTS_NAME} and {CONFIG_NAME}); "
                "train one with: python -m harmonica.reference.classifier --out DIR"
            )
        raw = json.loads(config_path.read_text())
        fields = ClassifierConfig.__dataclass_fields__
        model = cls(ClassifierConfig(**{k: v for k, v in raw.items() if k in fields}))
        model.load_state_dict(load_file(str(weights)))
        return model.eval()


@torch.no_grad()
def evaluate_accuracy(
    model: nn.Module, images: torch.Tensor, labels: torch.Tensor, batch: int = 512
) -> float:
    """Share of ``images`` ``[N, 1, 16, 16]`` whose argmax logit equals ``labels`` ``[N]``."""
    was_training = model.training
    model.eval()
    correct = 0
    for i in range(0, len(images), batch):
        correct += (model(images[i : i + batch]).argmax(1) == labels[i : i + batch]).sum().item()
    model.train(was_training)
    return correct / len(images)


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
        prog="python -m harmonica.reference.classifier", description="Train the metric classifier."
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
