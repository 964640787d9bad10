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

A second, flow-matching reference model (:func:`load_flow_model`, :mod:`harmonica.reference.flow`):
an ``SD3Transformer2DModel`` trained by rectified flow on the same digits, conditioned through a
prompt pool (:func:`load_flow_prompts`) and sampled with ``FlowMatchEulerDiscreteScheduler``
(:func:`load_flow_scheduler`), so caching is also measured on a velocity-predicting model.
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
    "load_flow_model",
    "load_flow_prompts",
    "load_flow_scheduler",
    "load_model",
    "load_scheduler",
    "null_class_id",
]

ASSETS = Path(__file__).resolve().parent / "assets"
"""Folder of the packaged weights: ``dit-digits/`` (model + scheduler), ``sd3-digits/`` (the flow
model, its scheduler and prompt pool) and ``classifier/``."""
_MODEL_DIR = ASSETS / "dit-digits"
_FLOW_DIR = ASSETS / "sd3-digits"
_CLASSIFIER_DIR = ASSETS / "classifier"

NULL_CLASS = NUM_CLASSES
"""Null class id of the reference model (= ``config.num_embeds_ada_norm``); see :func:`null_class_id`."""


def _model_dir(
    path: str | os.PathLike[str] | None,
    packaged: Path = _MODEL_DIR,
    command: str = "python -m harmonica.reference.train",
) -> Path:
    directory = packaged if path is None else Path(path)
    if not (directory / "config.json").is_file():
        hint = (
            f"the packaged reference weights are missing; train them with `{command} --out {packaged}`"
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


def load_flow_model(
    path: str | os.PathLike[str] | None = None, dtype: torch.dtype = torch.float32
) -> nn.Module:
    """The flow-matching reference model (:mod:`harmonica.reference.flow`: an SD3 transformer trained by
    rectified flow on the digits), or any local ``SD3Transformer2DModel`` folder, in eval mode on the CPU.
    Sample it with :func:`load_flow_scheduler` and the prompts of :func:`load_flow_prompts`."""
    from diffusers import SD3Transformer2DModel

    directory = _model_dir(path, _FLOW_DIR, "python -m harmonica.reference.flow --steps 2000")
    model = SD3Transformer2DModel.from_pretrained(directory, torch_dtype=dtype, low_cpu_mem_usage=False)
    return model.eval()


def load_flow_scheduler(path: str | os.PathLike[str] | None = None) -> Any:
    """The ``FlowMatchEulerDiscreteScheduler`` saved with the flow reference model."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler.from_pretrained(_FLOW_DIR if path is None else path)


def load_flow_prompts() -> dict[str, torch.Tensor]:
    """The flow reference model's prompt pool, one prompt per digit (``prompt_embeds`` ``[10, 4, 64]``,
    ``pooled_prompt_embeds`` ``[10, 32]``), as :func:`harmonica.train_router`, ``harmonica compare``
    and ``harmonica sample`` take it; the unconditional prompt is all zeros."""
    from safetensors.torch import load_file

    return load_file(_FLOW_DIR / "prompts.safetensors")


def load_classifier(path: str | os.PathLike[str] | None = None) -> DigitsClassifier:
    """The metric classifier (:class:`DigitsClassifier`), eval mode, float32, CPU.

    Args:
        path: a folder written by ``DigitsClassifier.save``; default: the packaged one.
    """
    return DigitsClassifier.load(_CLASSIFIER_DIR if path is None else path)
