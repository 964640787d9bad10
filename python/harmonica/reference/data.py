"""The reference dataset: scikit-learn's bundled handwritten digits, upsampled to 16×16.

``sklearn.datasets.load_digits`` ships 1 797 real 8×8 grey-scale digits (integer intensities
0…16, ten classes, roughly balanced) inside the scikit-learn wheel, so nothing is downloaded.
The images are scaled to [-1, 1] and upsampled 8 → 16 with bicubic interpolation (clamped back
to [-1, 1], since bicubic overshoots slightly at the stroke edges).

The train/test split is a fixed, stratified 80/20 split (seed 0), so every user and every
script of the project sees the same 1 437 training and 360 held-out images.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["IMAGE_SIZE", "NUM_CLASSES", "Split", "load_dataset"]

IMAGE_SIZE = 16
"""Side length in pixels of the images :func:`load_dataset` returns."""
NUM_CLASSES = 10
"""Number of digit classes (labels 0…9)."""

Split = Literal["train", "test", "all"]

_SPLIT_SEED = 0
_TEST_FRACTION = 0.2
_MAX_INTENSITY = 16.0


def _split_indices(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Stratified 80/20 split of ``range(len(labels))``; fixed by ``_SPLIT_SEED``."""
    from sklearn.model_selection import train_test_split

    indices = np.arange(len(labels))
    train_idx, test_idx = train_test_split(
        indices, test_size=_TEST_FRACTION, random_state=_SPLIT_SEED, stratify=labels
    )
    return np.sort(train_idx), np.sort(test_idx)


def load_dataset(split: Split = "train") -> tuple[torch.Tensor, torch.Tensor]:
    """Load the reference digits.

    Args:
        split: ``"train"`` (1 437 images), ``"test"`` (360 held-out images) or ``"all"``
            (1 797 images, in scikit-learn's order). The split is stratified by class and fixed.

    Returns:
        ``(images, labels)``: ``images`` is float32 ``[n, 1, 16, 16]`` in [-1, 1] (background
        -1, ink +1), contiguous; ``labels`` is int64 ``[n]`` with values in 0…9.

    Raises:
        ValueError: if ``split`` is not one of the three names.
    """
    if split not in ("train", "test", "all"):
        raise ValueError(f"split must be 'train', 'test' or 'all', got {split!r}")
    from sklearn.datasets import load_digits

    digits = load_digits()
    labels = np.asarray(digits.target, dtype=np.int64)
    images = np.asarray(digits.images, dtype=np.float32)  # [n, 8, 8], values 0…16
    if split != "all":
        train_idx, test_idx = _split_indices(labels)
        keep = train_idx if split == "train" else test_idx
        images, labels = images[keep], labels[keep]

    x = torch.from_numpy(images).unsqueeze(1) / _MAX_INTENSITY * 2.0 - 1.0
    x = F.interpolate(x, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bicubic", align_corners=False)
    x = x.clamp_(-1.0, 1.0).contiguous()
    return x, torch.from_numpy(labels)
