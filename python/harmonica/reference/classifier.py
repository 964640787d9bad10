"""The metric classifier: a small CNN on the 16×16 reference digits.

Train it with ``python -m harmonica.reference.train_classifier --out DIR``.

It serves two metrics in :mod:`harmonica.eval`: the class accuracy of class-conditional samples
and the classifier-feature FID (no Inception weights can be fetched here, and Inception features
of 16×16 digits would mean little anyway). FID features are the penultimate layer *before* its
ReLU: after the ReLU some units are dead on the whole data set, which makes the covariance
singular and the Fréchet distance ill-conditioned.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .data import IMAGE_SIZE, NUM_CLASSES

__all__ = ["ClassifierConfig", "DigitsClassifier", "evaluate_accuracy"]

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
                "train one with: python -m harmonica.reference.train_classifier --out DIR"
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
