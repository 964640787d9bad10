"""Supported diffusers transformers: detection, routable units, fingerprints and FLOP profiles.

A **unit** is one residual branch of one transformer block (METHOD.md §1). Which branches a block
has is its family's adapter's business (:mod:`harmonica.adapters`); DiT and PixArt
(``BasicTransformerBlock``): for block i, ``"blocks.{i}.attn1"`` (self-attention), then
``"blocks.{i}.attn2"`` if the block has cross-attention (PixArt), then ``"blocks.{i}.ff"``. Units are
numbered in the order the model runs them; a schedule's column k is unit k.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from typing import Any

import torch
from diffusers import DiTTransformer2DModel
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from .adapters import adapter_for, supported_classes
from .adapters.base import UnsupportedModelError
from .adapters.basic import DEFAULT_TEXT_TOKENS

__all__ = [
    "SUPPORTED_MODELS",
    "FlopProfile",
    "UnsupportedModelError",
    "call_flop_profile",
    "default_latent_size",
    "describe_fingerprint",
    "fingerprint",
    "fingerprint_mismatch",
    "flop_profile",
    "load_local",
    "supported_class",
    "tie_dit_embedders",
    "transformer_of",
    "units",
]

SUPPORTED_MODELS: tuple[type[nn.Module], ...] = supported_classes()
"""Transformer classes :func:`harmonica.enable_cache` knows how to patch (the built-in adapters')."""

# Fingerprint keys that must match for a router to fit a model. ``sample_size`` is recorded but not
# compared: the same architecture runs at several resolutions (PixArt's aspect-ratio buckets).
_SHAPE_KEYS = (
    "class",
    "depth",
    "width",
    "heads",
    "head_dim",
    "patch_size",
    "in_channels",
    "out_channels",
    "units",
)


def tie_dit_embedders(model: DiTTransformer2DModel) -> DiTTransformer2DModel:
    """Copy block 0's conditioning embedder into every block of a DiT, in place; returns the model.

    diffusers' conversion of the original DiT checkpoints does this (one timestep and class embedder
    there, a copy per block here), so a random-weight DiT built for timing or testing gets the
    structure of the released ones (the engine computes equal embedders once per step).
    """
    state = model.transformer_blocks[0].norm1.emb.state_dict()
    for block in model.transformer_blocks[1:]:
        block.norm1.emb.load_state_dict(state)
    return model


def supported_class(model: nn.Module) -> type[nn.Module]:
    """The supported diffusers class ``model`` is an instance of.

    Raises:
        UnsupportedModelError: for any other model, naming the supported classes and families and
            how to add an adapter.
    """
    return adapter_for(model).model_class(model)


def transformer_of(pipe_or_transformer: Any) -> nn.Module:
    """The supported transformer itself, or a pipeline's ``.transformer``."""
    candidate = getattr(pipe_or_transformer, "transformer", pipe_or_transformer)
    supported_class(candidate)
    return candidate


def single_transformer(pipe_or_transformer: Any, action: str) -> nn.Module:
    """:func:`transformer_of` for ``action`` (a verb phrase), which runs one transformer over every
    step: a pipeline with two (Wan 2.2's stages) is refused, since either one would be treated as
    running steps the other runs."""
    if getattr(pipe_or_transformer, "transformer_2", None) is not None:
        raise ValueError(
            f"cannot {action} on this pipeline: it runs two transformers (Wan 2.2: transformer for the "
            "high-noise steps, transformer_2 for the low-noise ones) and this runs one over every step. "
            "Pass one of them with scheduler=pipe.scheduler (it is then treated as running all steps), "
            "or cache the pipeline with a schedule per transformer: enable_cache(pipe, (schedule_1, "
            "schedule_2)), each sized for its transformer's steps (harmonica.cache.stage_steps(pipe)), "
            "their forecasts fitted on the pipeline by fit_forecast(pipe, schedule=(schedule_1, schedule_2))"
        )
    return transformer_of(pipe_or_transformer)


def units(model: nn.Module) -> list[str]:
    """Names of the routable units of ``model``, in schedule-column order.

    DiT / PixArt block i contributes ``blocks.{i}.attn1``, ``blocks.{i}.attn2`` (only if it has
    cross-attention) and ``blocks.{i}.ff``; other families name theirs in their adapter
    (:mod:`harmonica.adapters`). Works on a model whose blocks are currently cached, too.
    """
    return adapter_for(model).units(model)


def fingerprint(model: nn.Module) -> dict[str, Any]:
    """What a router records about the model it was made for (JSON-serialisable).

    Keys: ``class``, ``depth`` (blocks), ``width`` (inner dim), ``heads``, ``head_dim``,
    ``patch_size``, ``in_channels``, ``out_channels``, ``sample_size`` (latent side),
    ``cross_attention_dim`` (None for DiT) and ``units`` (:func:`units`).
    """
    adapter = adapter_for(model)
    config = model.config
    patch = config.get("patch_size")
    out_channels = vars(model).get("out_channels") or config.get("out_channels") or config.in_channels
    sample_size = config.get("sample_size")
    return {
        "class": adapter.model_class(model).__name__,
        "depth": len(adapter.blocks(model)),
        "width": adapter.width(model),
        "heads": int(config.num_attention_heads),
        "head_dim": int(config.attention_head_dim),
        "patch_size": list(patch) if isinstance(patch, (list, tuple)) else patch,
        "in_channels": int(config.in_channels),
        "out_channels": int(out_channels),
        "sample_size": sample_size if sample_size is None else int(sample_size),
        "cross_attention_dim": config.get("cross_attention_dim"),
        "units": units(model),
        **adapter.fingerprint_extra(model),
    }


def describe_fingerprint(fp: dict[str, Any]) -> str:
    """A one-line shape description, e.g. ``DiTTransformer2DModel(depth=28, width=1152, ...; 56 units)``."""
    return (
        f"{fp.get('class')}(depth={fp.get('depth')}, width={fp.get('width')}, heads={fp.get('heads')}, "
        f"patch_size={fp.get('patch_size')}, in_channels={fp.get('in_channels')}; "
        f"{len(fp.get('units') or [])} units)"
    )


def fingerprint_mismatch(expected: dict[str, Any], actual: dict[str, Any]) -> list[str]:
    """Shape keys on which two fingerprints differ (empty when a router for ``expected`` fits ``actual``)."""
    return [key for key in _SHAPE_KEYS if expected.get(key) != actual.get(key)]


@dataclass(frozen=True)
class FlopProfile:
    """FLOPs of one forward of a batch-1 sample at the model's native token count.

    ``units[k]`` is unit k's branch (its module only: projections and attention, or the MLP);
    ``always`` is everything that runs on every step whatever the schedule (patch embedding,
    timestep/label/caption embeddings, adaLN modulation, final layer). Counted by torch's
    ``FlopCounterMode``, i.e. matmuls, convolutions and attention; elementwise work (norms,
    activations, residual adds) is not counted. Every count is linear in the batch size, so ratios
    hold for any batch.
    """

    always: int
    units: tuple[int, ...]
    tokens: int

    @property
    def total(self) -> int:
        """FLOPs of one uncached forward."""
        return self.always + sum(self.units)


def flop_profile(model: nn.Module, *, text_tokens: int = DEFAULT_TEXT_TOKENS) -> FlopProfile:
    """Per-unit FLOPs of ``model`` at its native resolution (``sample_size`` latents).

    Measured on a copy built on the meta device from the model's config (no memory, no compute;
    the real weights are never touched), once per architecture. PixArt's cross-attention is
    counted with ``text_tokens`` prompt tokens.
    """
    cls = supported_class(model)
    config_json = json.dumps(dict(model.config), sort_keys=True, default=str)
    return _flop_profile(cls, config_json, text_tokens)


def _config_value(value: Any) -> Any:
    # JSON turned tuples (e.g. Wan's patch_size) into lists; diffusers' configs hold tuples
    return tuple(value) if isinstance(value, list) else value


@functools.lru_cache(maxsize=32)
def _flop_profile(cls: type[nn.Module], config_json: str, text_tokens: int) -> FlopProfile:
    config = {k: _config_value(v) for k, v in json.loads(config_json).items() if not k.startswith("_")}
    with torch.device("meta"):
        meta_model = cls.from_config(config)
    adapter = adapter_for(meta_model)
    with torch.device("meta"):
        inputs = adapter.example_inputs(meta_model, text_tokens)
    return _counted_profile(meta_model, lambda: meta_model(**inputs), adapter.native_tokens(meta_model))


def _counted_profile(model: nn.Module, call: Any, tokens: int) -> FlopProfile:
    adapter = adapter_for(model)
    counter = FlopCounterMode(display=False, depth=None)
    with counter, torch.no_grad():
        call()
    per_module = {name: sum(ops.values()) for name, ops in counter.get_flop_counts().items()}
    unit_flops = []
    for list_name, _, index, block in adapter.blocks(model):
        path = f"{type(model).__name__}.{list_name}.{index}"
        for branch in adapter.block_units(list_name, block):
            unit_flops.append(int(adapter.unit_flops(per_module, path, list_name, block, branch)))
    total = int(counter.get_total_flops())
    return FlopProfile(always=total - sum(unit_flops), units=tuple(unit_flops), tokens=tokens)


def call_flop_profile(model: nn.Module, call: Any, tokens: int) -> FlopProfile:
    """Per-unit FLOPs of the transformer call ``call()`` makes on ``model`` (an unpatched model; one
    sample, no CFG rows), e.g. at a benchmark's resolution rather than the native one that
    :func:`flop_profile` counts; ``tokens`` is recorded as the profile's image-token count. Runs the
    call once for real."""
    if model.__dict__.get("_harmonica_cache") is not None:
        raise ValueError("call_flop_profile counts the unpatched model: disable_cache() first")
    return _counted_profile(model, call, tokens)


def load_local(
    path: Any, *, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"
) -> tuple[nn.Module, Any]:
    """Load a supported transformer and its scheduler from a local folder (never downloads).

    ``path`` is either a diffusers pipeline folder (``transformer/`` and ``scheduler/`` inside) or a
    transformer folder (``config.json`` + weights, and ``scheduler_config.json`` beside them, as the
    reference model ships, or a pipeline's ``transformer/`` or ``transformer_2/``, sampled with the
    pipeline's ``scheduler/``). A pipeline with two transformers is refused (pass one of them). The
    packaged reference model is not loaded here (the engine does not depend on it):
    ``harmonica.reference.load_model()``, or the CLI without ``--model``.

    Returns:
        ``(transformer, scheduler)``, the transformer in eval mode on ``device`` in ``dtype``.

    Raises:
        FileNotFoundError: no model at ``path``.
        ValueError: the folder holds no supported transformer or no scheduler.
    """
    from pathlib import Path

    from diffusers import SchedulerMixin

    if path is None:
        raise ValueError(
            "load_local needs a model folder; the packaged reference model loads with "
            "harmonica.reference.load_model() and load_scheduler()"
        )
    root = Path(path)
    if not root.is_dir():
        raise FileNotFoundError(f"no model folder at {root}")
    if (root / "transformer_2" / "config.json").is_file():
        raise ValueError(
            f"{root} is a pipeline with two transformers (Wan 2.2: transformer for the high-noise steps, "
            "transformer_2 for the low-noise ones); a model folder runs one transformer over every step. "
            f"Pass {root / 'transformer'} or {root / 'transformer_2'} (it then runs all the steps, with "
            "the pipeline's scheduler), or load the pipeline in Python: enable_cache(pipe, (schedule_1, "
            "schedule_2)) and fit_forecast(pipe, schedule=(schedule_1, schedule_2)) run both"
        )
    model_dir, scheduler_dir = (
        (root / "transformer", root / "scheduler") if (root / "transformer").is_dir() else (root, root)
    )
    if not (scheduler_dir / "scheduler_config.json").is_file() and (
        root.parent / "scheduler" / "scheduler_config.json"
    ).is_file():
        scheduler_dir = root.parent / "scheduler"  # a pipeline's transformer folder: its pipeline's sampler
    config_file = model_dir / "config.json"
    if not config_file.is_file():
        raise ValueError(
            f"{model_dir} has no config.json: expected a diffusers transformer or pipeline folder"
        )
    class_name = json.loads(config_file.read_text()).get("_class_name")
    classes = {cls.__name__: cls for cls in SUPPORTED_MODELS}
    if class_name not in classes:
        raise ValueError(f"{model_dir} holds a {class_name}; harmonica supports {', '.join(classes)}")
    scheduler_config = scheduler_dir / "scheduler_config.json"
    if not scheduler_config.is_file():
        raise ValueError(
            f"no scheduler_config.json in {scheduler_dir}: save the scheduler the model samples with there"
        )
    import diffusers

    scheduler_class = json.loads(scheduler_config.read_text()).get("_class_name")
    scheduler_type = getattr(diffusers, str(scheduler_class), None)
    if not (isinstance(scheduler_type, type) and issubclass(scheduler_type, SchedulerMixin)):
        raise ValueError(f"{scheduler_config} names an unknown scheduler class {scheduler_class!r}")
    transformer = _from_pretrained(classes[class_name], model_dir, dtype).to(device).eval()
    return transformer, scheduler_type.from_config(json.loads(scheduler_config.read_text()))


def _from_pretrained(cls: type[nn.Module], folder: Any, dtype: torch.dtype) -> nn.Module:
    """``cls.from_pretrained(folder)``; for a class that keeps some modules in fp32 (Wan) without
    accelerate installed, which diffusers then refuses (it needs ``low_cpu_mem_usage``), the model
    is built from its config and its safetensors weights loaded strictly."""
    import importlib.util

    if getattr(cls, "_keep_in_fp32_modules", None) is None or importlib.util.find_spec("accelerate"):
        return cls.from_pretrained(folder, torch_dtype=dtype)
    from safetensors.torch import load_file

    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ValueError(f"{folder} has no .safetensors weights (install accelerate to load other formats)")
    state: dict[str, torch.Tensor] = {}
    for file in files:
        state.update(load_file(str(file)))
    model = cls.from_config(cls.load_config(folder))
    model.load_state_dict(state, strict=True)
    keep = set(cls._keep_in_fp32_modules)
    model.to(dtype)
    if dtype != torch.float32:  # as diffusers: the named modules stay in fp32
        for name, module in model.named_modules():
            if keep & set(name.split(".")):
                module.to(torch.float32)
    return model


def default_latent_size(transformer: nn.Module) -> int:
    """Image tokens per side when none is given: SD3's native ``sample_size / patch_size``, else 32
    (FLUX at 512 px); the default of ``harmonica compare``, :func:`harmonica.train_router`,
    :func:`harmonica.search_schedule` and :func:`harmonica.fit_forecast`."""
    config = transformer.config
    if supported_class(transformer).__name__ == "SD3Transformer2DModel":
        return int(config.sample_size) // int(config.patch_size)
    return 32
