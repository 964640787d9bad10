"""Caching methods side by side: ours (harmonica schedules and routers) and peers through their own APIs.

Every method is a :class:`Method`: a label, a family, whether it is ours or a peer, the settings it
runs with, and :meth:`Method.attach`, which installs it on a transformer and returns an
:class:`Attachment`. One attachment serves any number of generations (each wrapped in
:meth:`Attachment.generation`, which resets the method's per-generation state) and
:meth:`Attachment.detach` restores the transformer exactly.

The peers are not re-implemented here; each runs through its project's public entry point:

- diffusers hooks (``diffusers.hooks``): ``apply_first_block_cache`` (FirstBlockCache),
  ``apply_taylorseer_cache`` (TaylorSeer), ``apply_mag_cache`` (MagCache, after its own calibration
  run), ``apply_pyramid_attention_broadcast`` (PAB);
- cache-dit (optional, ``pip install cache-dit``): ``cache_dit.enable_cache`` with a
  ``DBCacheConfig``, ``cache_dit.refresh_context`` per generation, ``cache_dit.disable_cache``.

What this module adds is the glue a diffusers DiT or PixArt transformer needs and does not have:

- diffusers' DiT and PixArt models do not inherit ``CacheMixin``: no ``enable_cache`` /
  ``cache_context`` methods. The hooks are applied with the ``apply_*`` functions, and the cache
  context that stateful hooks (FirstBlockCache, TaylorSeer) require is set on their state managers
  by hand, as ``CacheMixin.cache_context`` would. Without it FirstBlockCache raises "No cache
  context is set".
- PAB needs a callback returning the current timestep (a pipeline's ``current_timestep``); a
  forward pre-hook on the transformer records the timestep it is called with.
- TaylorSeer's default module patterns (``^transformer_blocks.*attn`` under ``re.fullmatch``) match
  no module of a ``BasicTransformerBlock`` (``attn1``, ``attn2``, ``ff``), so by default it hooks
  nothing and skips nothing; :class:`TaylorSeer` passes patterns for the units explicitly unless
  asked for the defaults (kept to show the trap).
- cache-dit's DBCache computes the first ``Fn_compute_blocks`` (default 8) blocks on every step, so
  on an 8-block model its default skips nothing; :class:`DBCache` defaults to ``Fn = 1, Bn = 0``.
- Detaching: diffusers' hook removal leaves the original ``forward`` as an instance attribute and
  empty hook registries behind, and cache-dit leaves its patched DiT ``forward`` and a duplicate
  ``_norm1_emb`` submodule. After the peer's own removal, :class:`_Snapshot` deletes whatever
  attributes and submodules were added, so the model is the one it was.

Whether a method really skipped compute is not taken from the method's word: :class:`UnitCounter`
hooks the parametrised leaf modules inside every unit (``attn1``, ``attn2``, ``ff`` of every block)
and records which units executed at which transformer call.
"""

from __future__ import annotations

import abc
import ast
import contextlib
import copy
import importlib.util
import io
import logging
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import torch
from torch import nn

from .adapters import adapter_for
from .cache import disable_cache, enable_cache
from .models import units
from .router import Router
from .schedule import CacheSchedule, times_keywords

__all__ = [
    "FAMILIES",
    "Attachment",
    "DBCache",
    "FirstBlockCache",
    "Fora",
    "FittedForecast",
    "Forecast",
    "LogSnrForecast",
    "MagCache",
    "Method",
    "PyramidAttentionBroadcast",
    "RouterMethod",
    "RunInfo",
    "StepForecast",
    "TaylorSeer",
    "UnitCounter",
    "cache_dit_available",
]

Origin = Literal["ours", "peer"]


@dataclass(frozen=True)
class RunInfo:
    """What a method may need to know about the sampling run it is attached for.

    ``calibrate`` runs one uncached generation of the calibration batch on the (clean) transformer
    and returns nothing; a method that needs a calibration pass (MagCache) wraps it around its own
    calibration hooks. ``memo`` holds results shared by the methods of one run (the calibration).
    ``fit_setup`` makes router training's sampling set-up for the run's model, sampler and conditions
    (fitted forecasts draw their own noise from ``seed``); ``scheduler`` is the run's sampler.
    """

    num_inference_steps: int
    calibrate: Callable[[], None]
    memo: dict[str, Any] = field(default_factory=dict)
    fit_setup: Callable[[], Any] | None = None
    seed: int = 0
    scheduler: Any = None


class Attachment(abc.ABC):
    """A method installed on a transformer."""

    @abc.abstractmethod
    def generation(self) -> contextlib.AbstractContextManager[None]:
        """Wrap exactly one sampling run (``num_inference_steps`` transformer calls)."""

    @abc.abstractmethod
    def detach(self) -> None:
        """Remove the method; the transformer computes exactly what it computed before :meth:`attach`."""


@dataclass
class Method(abc.ABC):
    """One caching method at one strength."""

    label: str
    family: ClassVar[str]
    origin: ClassVar[Origin]

    @property
    def settings(self) -> dict[str, Any]:
        """The method's settings as JSON-able values (for the report)."""
        return {}

    def unavailable(self) -> str | None:
        """Why the method cannot run here (a missing optional package), or None."""
        return None

    def prepare(self, transformer: nn.Module, run: RunInfo) -> None:  # noqa: B027 - optional step
        """One-time work before the first :meth:`attach` for this run (e.g. MagCache calibration)."""

    @abc.abstractmethod
    def attach(self, transformer: nn.Module, run: RunInfo) -> Attachment:
        """Install the method on ``transformer`` (a diffusers DiT / PixArt transformer)."""


# -- ours ------------------------------------------------------------------------------------------


class _HarmonicaAttachment(Attachment):
    def __init__(self, transformer: nn.Module, schedule_or_router: Any, threshold: float) -> None:
        self._transformer = transformer
        self._handle = enable_cache(transformer, schedule_or_router, threshold=threshold)

    @contextlib.contextmanager
    def generation(self) -> Iterator[None]:
        # harmonica.sample() resets the handle itself; other drivers rely on this.
        self._handle.reset()
        yield

    def detach(self) -> None:
        disable_cache(self._transformer)


@dataclass
class Fora(Method):
    """FORA (METHOD.md §7) on harmonica's engine: every unit computed on steps ``t % interval == 0``."""

    interval: int = 2
    family = "FORA"
    origin = "ours"

    @property
    def settings(self) -> dict[str, Any]:
        return {"interval": self.interval}

    def schedule(self, transformer: nn.Module, num_steps: int) -> CacheSchedule:
        return CacheSchedule.fora(num_steps, len(units(transformer)), self.interval)

    def attach(self, transformer: nn.Module, run: RunInfo) -> Attachment:
        return _HarmonicaAttachment(transformer, self.schedule(transformer, run.num_inference_steps), 0.1)


@dataclass
class Forecast(Fora):
    """FORA with Taylor forecasting on harmonica's engine (:meth:`CacheSchedule.fora` with ``order``):
    the skipped steps extrapolate each unit from its last computed outputs, in the fused forecast ops.
    ``times`` (a class attribute): where the rule measures the distances between steps, ``"blend"`` =
    the mean of its forecasts in step index and in the run's sampler's log-SNR (``scheduler=``, the
    default), ``"step"`` = the step index (TaylorSeer's rule), ``"log-snr"`` = the sampler's log-SNR."""

    order: int = 2
    family = "forecast"
    times = "blend"
    _scheduler: Any = field(default=None, init=False, repr=False)

    @property
    def settings(self) -> dict[str, Any]:
        return {"interval": self.interval, "order": self.order, "times": self.times}

    def prepare(self, transformer: nn.Module, run: RunInfo) -> None:
        if self.times != "step" and run.scheduler is None:
            raise ValueError(f"{self.family} needs the run's sampler (RunInfo.scheduler) for its log-SNR")
        self._scheduler = run.scheduler

    def schedule(self, transformer: nn.Module, num_steps: int) -> CacheSchedule:
        if self.times != "step" and self._scheduler is None:
            raise RuntimeError("prepare() reads the run's sampler before the schedule is used")
        where = times_keywords(self.times, self._scheduler, num_steps)
        return CacheSchedule.fora(
            num_steps, len(units(transformer)), self.interval, order=self.order, **where
        )


@dataclass
class StepForecast(Forecast):
    """:class:`Forecast` with the rule in step index alone: TaylorSeer's rule on harmonica's engine."""

    family = "forecast (step index)"
    times = "step"


@dataclass
class LogSnrForecast(Forecast):
    """:class:`Forecast` with the rule in the sampler's log-SNR alone
    (:func:`harmonica.schedule.log_snr_times`)."""

    family = "forecast (log-SNR)"
    times = "log-snr"


@dataclass
class FittedForecast(StepForecast):
    """:class:`Forecast` with coefficients fitted on the compared model (:func:`harmonica.fit_forecast`
    on 16 samples of noise drawn from the run's seed + 2, not the evaluation noise, from the step-index
    rule's coefficients as the ridge's prior), once per run."""

    family = "fitted forecast"
    _fitted: CacheSchedule | None = field(default=None, init=False, repr=False)

    def prepare(self, transformer: nn.Module, run: RunInfo) -> None:
        from .forecast import DEFAULT_RIDGE, fit_on

        if run.fit_setup is None:
            raise ValueError("fitting forecasts needs the run's sampling set-up (RunInfo.fit_setup)")
        rule = super().schedule(transformer, run.num_inference_steps)
        fit = fit_on(run.fit_setup(), rule, batch_size=16, seed=run.seed, ridge=DEFAULT_RIDGE, progress=False)
        self._fitted = fit.schedule

    def schedule(self, transformer: nn.Module, num_steps: int) -> CacheSchedule:
        if self._fitted is None or self._fitted.num_steps != num_steps:
            raise RuntimeError("prepare() fits the forecast before the schedule is used")
        return self._fitted


@dataclass
class EvenSteps(Method):
    """Whole-step reuse at a chosen usage (:meth:`CacheSchedule.even_steps`) on harmonica's engine."""

    usage: float = 0.35
    family = "even steps"
    origin = "ours"

    @property
    def settings(self) -> dict[str, Any]:
        return {"usage": self.usage}

    def schedule(self, transformer: nn.Module, num_steps: int) -> CacheSchedule:
        return CacheSchedule.even_steps(num_steps, len(units(transformer)), self.usage)

    def attach(self, transformer: nn.Module, run: RunInfo) -> Attachment:
        return _HarmonicaAttachment(transformer, self.schedule(transformer, run.num_inference_steps), 0.1)


@dataclass
class RouterMethod(Method):
    """A trained harmonica router (``Router.load(path, model=...)``) at inference threshold τ."""

    path: str = ""
    threshold: float = 0.1
    family = "router"
    origin = "ours"
    _router: Router | None = field(default=None, init=False, repr=False)

    @property
    def settings(self) -> dict[str, Any]:
        return {"path": self.path, "threshold": self.threshold}

    def load(self, transformer: nn.Module, num_steps: int) -> Router:
        """Load (once) and check the router against the model and the step count.

        Raises:
            FileNotFoundError / ValueError: unreadable file, another model's router, or a router
                trained for another number of sampling steps.
        """
        if self._router is None:
            router = Router.load(self.path, model=transformer)
            wrong_steps = router.steps_mismatch(num_steps)
            if wrong_steps is not None:
                raise ValueError(f"router {self.label!r} ({self.path}) {wrong_steps}")
            self._router = router
        return self._router

    def schedule(self, transformer: nn.Module, num_steps: int) -> CacheSchedule:
        return self.load(transformer, num_steps).to_schedule(self.threshold)

    def attach(self, transformer: nn.Module, run: RunInfo) -> Attachment:
        router = self.load(transformer, run.num_inference_steps)
        return _HarmonicaAttachment(transformer, router, self.threshold)


# -- restoring a model after a peer ------------------------------------------------------------------


class _Snapshot:
    """Attribute and submodule names of every module of a model, to delete what a peer leaves behind.

    Submodule order is restored too: cache-dit swaps ``transformer_blocks`` with ``mock.patch`` on
    every call, which deletes and re-adds it, moving it to the end of ``_modules`` (and of the
    ``state_dict``).
    """

    def __init__(self, model: nn.Module) -> None:
        self._entries = [(m, set(m.__dict__), list(m._modules)) for m in model.modules()]

    def restore(self) -> None:
        for module, attrs, children in self._entries:
            current = dict(module._modules)
            module._modules.clear()
            module._modules.update({name: current[name] for name in children if name in current})
            for name in set(module.__dict__) - attrs:
                del module.__dict__[name]


# -- diffusers hooks --------------------------------------------------------------------------------


def _registries(model: nn.Module) -> list[Any]:
    return [m._diffusers_hook for m in model.modules() if "_diffusers_hook" in m.__dict__]


def _set_cache_context(model: nn.Module, name: str | None) -> None:
    """What ``CacheMixin.cache_context`` does, for models without the mixin (DiT, PixArt).

    Every stateful hook keeps its per-generation state in a ``StateManager`` keyed by the context
    name; classifier-free guidance is batched into one call here, so one context ("cond") holds it all.
    """
    from diffusers.hooks.hooks import StateManager

    try:
        from diffusers.hooks.hooks import CacheContext

        context: Any = None if name is None else CacheContext(name)
    except ImportError:  # diffusers < 0.42 keys the state by the bare name
        context = name
    for registry in _registries(model):
        for hook in registry.hooks.values():
            for value in vars(hook).values():
                if isinstance(value, StateManager):
                    value.set_context(context)


class _DiffusersHookAttachment(Attachment):
    def __init__(self, transformer: nn.Module) -> None:
        from diffusers.hooks import HookRegistry

        self._transformer = transformer
        self._snapshot = _Snapshot(transformer)
        self._hooks_before = {id(r): set(r.hooks) for r in _registries(transformer)}
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._current_timestep = 0
        self._timestep_scale = adapter_for(transformer).timestep_scale
        self._registry_cls = HookRegistry

    def record_timestep(self) -> Callable[[], int]:
        """A PAB ``current_timestep_callback``: the timestep of the transformer call in progress."""

        def pre_hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            timestep = kwargs.get("timestep", args[1] if len(args) > 1 else None)
            if isinstance(timestep, torch.Tensor):
                timestep = timestep.flatten()[0].item()
            # in the scheduler's 0-1000 scale (FLUX and Qwen-Image are called with t / 1000)
            self._current_timestep = (
                int(round(timestep * self._timestep_scale)) if timestep is not None else 0
            )

        self._handles.append(self._transformer.register_forward_pre_hook(pre_hook, with_kwargs=True))
        return lambda: self._current_timestep

    @contextlib.contextmanager
    def generation(self) -> Iterator[None]:
        # What a diffusers pipeline does around its denoising loop: reset the stateful hooks, then
        # run every transformer call inside a cache context.
        self._registry_cls.check_if_exists_or_initialize(self._transformer).reset_stateful_hooks(recurse=True)
        _set_cache_context(self._transformer, "cond")
        try:
            yield
        finally:
            _set_cache_context(self._transformer, None)

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        for registry in _registries(self._transformer):
            before = self._hooks_before.get(id(registry), set())
            for name in [n for n in registry._hook_order if n not in before][::-1]:
                registry.remove_hook(name, recurse=False)
        self._snapshot.restore()


def _diffusers_attachment(
    transformer: nn.Module,
    apply: Callable[[nn.Module, Any], None],
    make_config: Callable[[_DiffusersHookAttachment], Any],
) -> _DiffusersHookAttachment:
    """Apply a diffusers cache hook; the config is built against the attachment (PAB's needs its
    timestep callback). A failure half-way removes whatever was installed."""
    attachment = _DiffusersHookAttachment(transformer)
    try:
        apply(transformer, make_config(attachment))
    except BaseException:
        attachment.detach()
        raise
    return attachment


_UNIT_PATTERN = r"transformer_blocks\.\d+\.(attn1|attn2|ff)"


def unit_module_pattern(transformer: nn.Module) -> str:
    """A regex (``re.fullmatch`` on module paths) for the modules of every unit of ``transformer``:
    the branch's own submodule (a joint attention once, for both its streams), or for a branch that
    is not one submodule (FLUX's single-block joint branch) the block's children it runs."""
    adapter = adapter_for(transformer)
    children: dict[str, list[str]] = {}
    for list_name, _, _, block in adapter.blocks(transformer):
        names = children.setdefault(list_name, [])
        for branch in adapter.block_units(list_name, block):
            if isinstance(getattr(block, branch, None), nn.Module):
                found = [branch]
            else:
                modules = adapter.unit_modules(list_name, block, branch)
                found = [n for n, c in block.named_children() if any(c is m for m in modules)]
            names += [n for n in found if n not in names]
    return "|".join(
        rf"{re.escape(list_name)}\.\d+\.({'|'.join(names)})" for list_name, names in children.items() if names
    )


@dataclass
class FirstBlockCache(Method):
    """diffusers FirstBlockCache: skip blocks 2…L of a step when block 1's residual barely changed.

    The skip decision compares ``mean|Δ residual₁| / mean|residual₁|`` with ``threshold`` on every
    step (one host sync per step).
    """

    threshold: float = 0.05
    family = "FirstBlockCache"
    origin = "peer"

    @property
    def settings(self) -> dict[str, Any]:
        return {"threshold": self.threshold}

    def attach(self, transformer: nn.Module, run: RunInfo) -> Attachment:
        from diffusers.hooks import FirstBlockCacheConfig, apply_first_block_cache

        return _diffusers_attachment(
            transformer, apply_first_block_cache, lambda _: FirstBlockCacheConfig(threshold=self.threshold)
        )


@dataclass
class TaylorSeer(Method):
    """diffusers TaylorSeerCache: full compute every ``cache_interval`` steps, Taylor-forecast between.

    ``cache_identifiers=None`` keeps diffusers' default module patterns, which match nothing on a
    DiT/PixArt block; the default here names the units (``attn1``, ``attn2``, ``ff``) explicitly,
    and on the other families the units' modules (:func:`unit_module_pattern`).
    Taylor factors are kept in float32 (diffusers' default bf16 would add rounding error of its own
    to an fp32 model).
    """

    cache_interval: int = 5
    max_order: int = 1
    disable_cache_before_step: int = 3
    cache_identifiers: list[str] | None = field(default_factory=lambda: [_UNIT_PATTERN])
    family = "TaylorSeer"
    origin = "peer"

    @property
    def settings(self) -> dict[str, Any]:
        return {
            "cache_interval": self.cache_interval,
            "max_order": self.max_order,
            "disable_cache_before_step": self.disable_cache_before_step,
            "cache_identifiers": self.cache_identifiers,
        }

    def prepare(self, transformer: nn.Module, run: RunInfo) -> None:
        # The default names DiT's units; another family's units are named from its adapter.
        from .adapters.basic import BasicBlockAdapter

        if self.cache_identifiers == [_UNIT_PATTERN] and not isinstance(
            adapter_for(transformer), BasicBlockAdapter
        ):
            self.cache_identifiers = [unit_module_pattern(transformer)]

    def attach(self, transformer: nn.Module, run: RunInfo) -> Attachment:
        from diffusers.hooks import TaylorSeerCacheConfig, apply_taylorseer_cache

        self.prepare(transformer, run)

        def config(_: Any) -> Any:
            return TaylorSeerCacheConfig(
                cache_interval=self.cache_interval,
                max_order=self.max_order,
                disable_cache_before_step=self.disable_cache_before_step,
                taylor_factors_dtype=torch.float32,
                cache_identifiers=None if self.cache_identifiers is None else list(self.cache_identifiers),
            )

        return _diffusers_attachment(transformer, apply_taylorseer_cache, config)


@dataclass
class MagCache(Method):
    """diffusers MagCache: skip whole steps while the accumulated magnitude-ratio error stays ≤ threshold.

    ``prepare`` runs MagCache's own calibration (``MagCacheConfig(calibrate=True)``: one uncached
    generation that prints the per-step ratios ``mean‖r_t‖ / ‖r_{t-1}‖`` of the residual over all
    blocks) and reads the printed ratios, as its documentation instructs. At most
    ``max_skip_steps`` consecutive steps are skipped, so past some threshold the cap alone decides.
    """

    threshold: float = 0.06
    max_skip_steps: int = 3
    retention_ratio: float = 0.2
    family = "MagCache"
    origin = "peer"
    mag_ratios: list[float] | None = field(default=None, init=False)

    @property
    def settings(self) -> dict[str, Any]:
        return {
            "threshold": self.threshold,
            "max_skip_steps": self.max_skip_steps,
            "retention_ratio": self.retention_ratio,
            "mag_ratios": self.mag_ratios,
        }

    def prepare(self, transformer: nn.Module, run: RunInfo) -> None:
        self.mag_ratios = calibrate_mag_cache(transformer, run)

    def attach(self, transformer: nn.Module, run: RunInfo) -> Attachment:
        from diffusers.hooks import MagCacheConfig, apply_mag_cache

        if self.mag_ratios is None:
            self.prepare(transformer, run)

        def config(_: Any) -> Any:
            return MagCacheConfig(
                threshold=self.threshold,
                max_skip_steps=self.max_skip_steps,
                retention_ratio=self.retention_ratio,
                num_inference_steps=run.num_inference_steps,
                mag_ratios=list(self.mag_ratios),
            )

        return _diffusers_attachment(transformer, apply_mag_cache, config)


def calibrate_mag_cache(transformer: nn.Module, run: RunInfo) -> list[float]:
    """MagCache's calibration pass on ``transformer`` (once per run: memoised in ``run.memo``).

    Returns:
        ``num_inference_steps`` floats, the ratios MagCache printed.

    Raises:
        RuntimeError: if MagCache printed no ratios (its calibration output format changed).
    """
    if "mag_ratios" in run.memo:
        return list(run.memo["mag_ratios"])
    from diffusers.hooks import MagCacheConfig, apply_mag_cache

    printed = io.StringIO()
    config = MagCacheConfig(calibrate=True, num_inference_steps=run.num_inference_steps)
    attachment = _diffusers_attachment(transformer, apply_mag_cache, lambda _: config)
    try:
        with attachment.generation(), contextlib.redirect_stdout(printed):
            run.calibrate()
    finally:
        attachment.detach()
    ratios = None
    for line in printed.getvalue().splitlines():
        if line.strip().startswith("["):
            with contextlib.suppress(ValueError, SyntaxError):
                ratios = [float(x) for x in ast.literal_eval(line.strip())]
    if not ratios or len(ratios) != run.num_inference_steps:
        raise RuntimeError(
            "MagCache calibration printed no ratio list of the expected length; got:\n" + printed.getvalue()
        )
    run.memo["mag_ratios"] = ratios
    return list(ratios)


@dataclass
class PyramidAttentionBroadcast(Method):
    """diffusers PAB: self-attention recomputed every ``skip_range``-th call inside the timestep window.

    Only attention is broadcast (feed-forward always runs), and only while the timestep lies strictly
    inside ``timestep_range``.
    """

    skip_range: int = 2
    timestep_range: tuple[int, int] = (100, 800)
    family = "PAB"
    origin = "peer"

    @property
    def settings(self) -> dict[str, Any]:
        return {"skip_range": self.skip_range, "timestep_range": list(self.timestep_range)}

    def attach(self, transformer: nn.Module, run: RunInfo) -> Attachment:
        from diffusers.hooks import PyramidAttentionBroadcastConfig, apply_pyramid_attention_broadcast

        def config(attachment: _DiffusersHookAttachment) -> Any:
            return PyramidAttentionBroadcastConfig(
                spatial_attention_block_skip_range=self.skip_range,
                spatial_attention_timestep_skip_range=tuple(self.timestep_range),
                cross_attention_block_skip_range=self.skip_range,
                cross_attention_timestep_skip_range=tuple(self.timestep_range),
                current_timestep_callback=attachment.record_timestep(),
            )

        return _diffusers_attachment(transformer, apply_pyramid_attention_broadcast, config)


# -- cache-dit --------------------------------------------------------------------------------------


def cache_dit_available() -> bool:
    """Whether the optional ``cache-dit`` package is installed (``pip install harmonica[peers]``)."""
    return importlib.util.find_spec("cache_dit") is not None


@contextlib.contextmanager
def _quiet_cache_dit() -> Iterator[None]:
    """cache-dit logs every enable/refresh/disable at INFO/WARNING on its own non-propagating loggers."""
    loggers = [
        logging.getLogger(name)
        for name in list(logging.Logger.manager.loggerDict)
        if name == "cache_dit" or name.startswith("cache_dit.")
    ]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


class _CacheDitAttachment(Attachment):
    def __init__(self, transformer: nn.Module, config: Any) -> None:
        import cache_dit

        self._transformer = transformer
        self._config = config
        self._snapshot = _Snapshot(transformer)
        with _quiet_cache_dit():
            try:
                cache_dit.enable_cache(transformer, cache_config=copy.deepcopy(config))
            except BaseException:
                self.detach()
                raise

    @contextlib.contextmanager
    def generation(self) -> Iterator[None]:
        import cache_dit

        # A bare transformer gets a persistent context; refreshing it starts a new generation.
        with _quiet_cache_dit():
            cache_dit.refresh_context(self._transformer, cache_config=copy.deepcopy(self._config))
        yield

    def detach(self) -> None:
        import cache_dit

        with _quiet_cache_dit():
            if getattr(self._transformer, "_context_manager", None) is not None:
                cache_dit.disable_cache(self._transformer)
        self._snapshot.restore()


@dataclass
class DBCache(Method):
    """cache-dit DBCache (Fn/Bn dual-block cache): the first ``Fn`` blocks always run and probe the
    residual change; when it is below ``threshold`` the middle blocks are served from cache.

    ``Fn = 1, Bn = 0`` by default (cache-dit's own default ``Fn = 8`` leaves nothing to skip on an
    8-block model); ``max_warmup_steps=None`` and the other settings are cache-dit's defaults
    (8 warm-up steps that are never cached: a run of 8 steps or fewer skips nothing).
    """

    threshold: float = 0.08
    fn_compute_blocks: int = 1
    bn_compute_blocks: int = 0
    max_warmup_steps: int | None = None
    family = "DBCache"
    origin = "peer"

    @property
    def settings(self) -> dict[str, Any]:
        return {
            "residual_diff_threshold": self.threshold,
            "Fn_compute_blocks": self.fn_compute_blocks,
            "Bn_compute_blocks": self.bn_compute_blocks,
            "max_warmup_steps": self.max_warmup_steps,
        }

    def unavailable(self) -> str | None:
        if not cache_dit_available():
            return "cache-dit is not installed (pip install 'harmonica[peers]' or pip install cache-dit)"
        return None

    def attach(self, transformer: nn.Module, run: RunInfo) -> Attachment:
        reason = self.unavailable()
        if reason:
            raise ValueError(f"{self.label}: {reason}")
        from cache_dit import DBCacheConfig

        extra = {} if self.max_warmup_steps is None else {"max_warmup_steps": self.max_warmup_steps}
        config = DBCacheConfig(
            Fn_compute_blocks=self.fn_compute_blocks,
            Bn_compute_blocks=self.bn_compute_blocks,
            residual_diff_threshold=self.threshold,
            num_inference_steps=run.num_inference_steps,
            **extra,
        )
        return _CacheDitAttachment(transformer, config)


FAMILIES: dict[str, type[Method]] = {
    "fora": Fora,
    "forecast": Forecast,
    "fitted": FittedForecast,
    "forecast (step index)": StepForecast,
    "forecast (log-SNR)": LogSnrForecast,
    "router": RouterMethod,
    "fbcache": FirstBlockCache,
    "taylorseer": TaylorSeer,
    "magcache": MagCache,
    "pab": PyramidAttentionBroadcast,
    "dbcache": DBCache,
}
"""Method families by their CLI name."""


# -- measuring what ran ------------------------------------------------------------------------------


class UnitCounter:
    """Records which units executed at each transformer call, from hooks on the units' own layers.

    A unit (``attn1``, ``attn2`` or ``ff`` of a DiT block; the modules its adapter's
    ``unit_modules`` names in other families) counts as executed in a call if any of its
    parametrised leaf modules (the q/k/v/out projections, the MLP linears) ran. The two streams of
    a joint attention (FLUX, SD3, Qwen-Image) run together: computing either runs both. Hooking the leaves
    rather than the unit module matters: diffusers' PAB and TaylorSeer hooks replace the unit's
    ``forward`` and answer from cache *inside* the unit's ``__call__``, so a hook on the unit itself
    would fire on skipped steps too.

    Use as a context manager; :attr:`executed` is then a bool tensor ``[calls, U]``, one row per
    transformer call in order, columns in :func:`harmonica.units` order.
    """

    def __init__(self, transformer: nn.Module) -> None:
        self._transformer = transformer
        self.unit_names = units(transformer)
        self._rows: list[list[bool]] = []
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    def __enter__(self) -> UnitCounter:
        self._rows = []
        index = {name: k for k, name in enumerate(self.unit_names)}
        self._handles.append(self._transformer.register_forward_pre_hook(self._new_call))
        adapter = adapter_for(self._transformer)
        for list_name, prefix, i, block in adapter.blocks(self._transformer):
            for branch in adapter.block_units(list_name, block):
                name = f"{prefix}.{i}.{branch}"
                leaves = [
                    m
                    for module in adapter.unit_modules(list_name, block, branch)
                    for m in module.modules()
                    if not m._modules and any(True for _ in m.parameters(recurse=False))
                ]
                if not leaves:
                    raise ValueError(f"unit {name} has no parametrised layer to count")
                for leaf in leaves:
                    self._handles.append(leaf.register_forward_hook(self._marker(index[name])))
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _new_call(self, module: nn.Module, args: tuple[Any, ...]) -> None:
        self._rows.append([False] * len(self.unit_names))

    def _marker(self, unit: int) -> Callable[..., None]:
        def mark(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
            if self._rows:
                self._rows[-1][unit] = True

        return mark

    @property
    def executed(self) -> torch.Tensor:
        """``[calls, U]`` bool: unit k ran during transformer call t."""
        if not self._rows:
            return torch.zeros(0, len(self.unit_names), dtype=torch.bool)
        return torch.tensor(self._rows, dtype=torch.bool)
