"""The reference model: a small class-conditional DiT trained by the project on real digits.

Pretrained hub weights cannot be downloaded here, so quality is measured on a real diffusers
``DiTTransformer2DModel`` (8 blocks, width 128, ~2.8 M parameters, 16 units) trained in pixel
space on scikit-learn's bundled handwritten digits, upsampled to 16×16 (:func:`load_dataset`).
Its weights ship as package data and load with ``from_pretrained`` exactly as a local DiT-XL/2
folder would; :func:`load_scheduler` gives the DDIM scheduler with the noise schedule it was
trained with, and :func:`load_classifier` the digits CNN that the metrics in
:mod:`harmonica.eval` use. The null (unconditional) class id for guidance is
``model.config.num_embeds_ada_norm`` = :data:`NULL_CLASS` = 10.

Retrain with ``python -m harmonica.reference.train --out DIR`` and
``python -m harmonica.reference.train_classifier --out DIR``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..sampling import null_class_id
from .classifier import DigitsClassifier
from .data import IMAGE_SIZE, NUM_CLASSES, load_dataset
from .model import disable_block_label_dropout

__all__ = [
    "ASSETS",
    "IMAGE_SIZE",
    "NULL_CLASS",
    "NUM_CLASSES",
    "DigitsClassifier",
    "load_classifier",
    "load_dataset",
    "load_model",
    "load_scheduler",
    "null_class_id",
]

ASSETS = Path(__file__).resolve().parent / "assets"
"""Folder of the packaged weights: ``dit-digits/`` (model + scheduler) and ``classifier/``."""
_MODEL_DIR = ASSETS / "dit-digits"
_CLASSIFIER_DIR = ASSETS / "classifier"

NULL_CLASS = NUM_CLASSES
"""Null class id of the reference model (= ``config.num_embeds_ada_norm``); see :func:`null_class_id`."""


def _model_dir(path: str | os.PathLike[str] | None) -> Path:
    directory = _MODEL_DIR if path is None else Path(path)
    if not (directory / "config.json").is_file():
        hint = (
            "the packaged reference weights are missing; train them with "
            f"`python -m harmonica.reference.train --out {_MODEL_DIR}`"
            if path is None
            else "expected a diffusers model folder (config.json + weights)"
        )
        raise FileNotFoundError(f"no model in {directory}: {hint}")
    return directory


def load_model(path: str | os.PathLike[str] | None = None, dtype: torch.dtype = torch.float32) -> nn.Module:
    """Load the reference DiT (or any local ``DiTTransformer2DModel`` folder) in eval mode.

    Args:
        path: a diffusers model folder; default: the packaged reference weights.
        dtype: parameter dtype of the returned model.

    Returns:
        ``diffusers.DiTTransformer2DModel`` on the CPU, eval mode. Its config gives the image
        size (``sample_size``), channels (``in_channels``) and the null class id used for
        guidance (``num_embeds_ada_norm``). The per-block label dropout is turned off, so even
        in train mode the labels passed in are the labels used.
    """
    from diffusers import DiTTransformer2DModel

    model = DiTTransformer2DModel.from_pretrained(
        _model_dir(path), torch_dtype=dtype, low_cpu_mem_usage=False
    )
    disable_block_label_dropout(model)
    return model.eval()


def load_scheduler(path: str | os.PathLike[str] | None = None) -> Any:
    """The ``DDIMScheduler`` saved with the model (cosine betas, x0 clipped to [-1, 1]).

    Args:
        path: a folder with ``scheduler_config.json``; default: the packaged reference model.
    """
    from diffusers import DDIMScheduler

    return DDIMScheduler.from_pretrained(_model_dir(path))


def load_classifier(path: str | os.PathLike[str] | None = None) -> DigitsClassifier:
    """The metric classifier (:class:`DigitsClassifier`), eval mode, float32, CPU.

    Args:
        path: a folder written by ``DigitsClassifier.save``; default: the packaged one.
    """
    return DigitsClassifier.load(_CLASSIFIER_DIR if path is None else path)
