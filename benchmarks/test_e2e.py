"""End-to-end sampling speed: cached vs uncached, side by side in one run (pytest-benchmark).

A bare DDIM loop with classifier-free guidance batched into one transformer call per step (as the
diffusers pipelines do), random weights (they time the same as trained ones). Models per size
(``HARMONICA_BENCH_SIZE``, see conftest.py):

- ``gpu``: DiT-XL/2 256² (28 blocks, width 1152, 16 heads, 32×32×4 latents, learned sigma),
  batch 8 + CFG, and PixArt-α 1024² (``PixArtTransformer2DModel``, 28 blocks, width 1152,
  128×128×4 latents → 4096 tokens, captions 120 × 4096 through its caption projection, cross-
  attention to 120 text tokens, resolution/aspect micro-conditions), batch 1 + CFG; 20 steps, bf16;
- ``cpu``: DiT-S/2 and a PixArt of the same size (12 blocks, width 384, 256 tokens), batch 2 + CFG,
  10 steps, fp32;
- ``smoke``: 2-block models of width 32, 4 steps (CI: it only has to run).

Flow-matching families (random weights, the family's pipeline call through its adapter's
``predict``, a flow-matching Euler loop with ``FlowMatchEulerDiscreteScheduler``'s sigmas, shift 3):

- ``cpu``: a FLUX.1-shaped model (4 double + 8 single blocks, FLUX's 1:2 ratio, width 384, 16×16 =
  256 packed latent tokens of 64 channels, 64 T5-width (4096) text tokens, guidance-distilled as
  FLUX.1-dev: the guidance scale is an input, no CFG rows), batch 2; and a Wan-2.1-shaped model
  (12 blocks, width 384, FFN 1536, one frame of 32×32×16 latents → 256 tokens, cross-attention to 64
  umT5-width text tokens), batch 2 + true CFG batched; 10 steps, fp32;
- ``smoke``: the same structures at width 32, 16 tokens, 4 steps.

Their FLOPs (and so the FLOP-ideal speedups) are counted on one call at the benchmark's own
resolution (:func:`harmonica.models.call_flop_profile`), not at the families' native 1024² size.

Variants: ``uncached`` (the unpatched diffusers model), ``full`` (``CacheSchedule.full``: the
engine's own overhead), ``fora2`` / ``fora3`` (FORA N=2 / N=3), ``forecast3`` (FORA N=3 with order-2
forecasting: 3 warm-up steps, history of 3 outputs per unit) and ``mask37`` (a
``CacheSchedule.from_mask`` schedule with cache usage 37.5 %, HarmoniCa's DiT-XL/2 T=20 figure:
row 0 computes everything, every later step reuses an equal share of units drawn at random), each
run in two modes:

- ``eager``: the loop as written, one kernel launch after another;
- ``graph`` (CUDA only): the whole sampling run — every transformer call, the guidance and the DDIM
  updates — captured once as one CUDA graph and replayed. That is possible because a schedule is
  fixed before sampling starts and nothing in a step reads device values on the host; the cache
  buffers, allocated at step 0, live in the graph's memory pool.

Pairing. On CUDA each cached round is paired with an uncached round of the same mode run just
before it (same machine state). On a CPU the machine's speed drifts by several per cent within a
sampling run (shared cores), more than the effects measured, so a cached eager round runs in
*lockstep* with an uncached copy of the model (same weights): both sampling loops advance one
denoising step at a time, the two calls of a step in alternating order, each timed on its own, so
every cached step has an uncached step next to it. ``speedup`` is the median over rounds of
uncached / cached time, and the rows keep each round's ratio (the README shows their range). The
``graph`` ``uncached`` row is paired with the eager uncached model instead (what capture alone
gains). Rows record the shapes, dtype, device, FLOPs per sampling run
(``torch.utils.flop_counter``, matmuls and attention), cache usage ratio, the FLOP-ideal speedup of
the schedule (:meth:`CacheSchedule.ideal_speedup`: an arithmetic bound, not a measurement), measured / ideal,
the cache memory, the error of the final latents against the uncached run, and (eager rows) the
ops of one sampling run that are not views, counted on dispatch: about one kernel launch each on a
GPU, where the host issuing them bounds DiT-XL/2's eager reuse steps (``profile_e2e.py``). On CUDA every time
is measured between CUDA events (so the device's wall-clock, launch gaps included).

The DiT models carry one conditioning embedder copied into every block, as the DiT checkpoints
converted by diffusers do; the engine computes it once per step for such blocks (the unpatched
model, once per block).

Run: ``pytest benchmarks/test_e2e.py``; ``-k dit`` or ``-k pixart`` picks a model.
"""

from __future__ import annotations

import copy
import statistics
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DiTTransformer2DModel,
    FlowMatchEulerDiscreteScheduler,
    FluxTransformer2DModel,
    PixArtTransformer2DModel,
    WanTransformer3DModel,
)
from torch.utils._python_dispatch import TorchDispatchMode

import harmonica_kernels as hk
from harmonica import CacheSchedule, disable_cache, enable_cache, units
from harmonica.adapters import adapter_for
from harmonica.models import DEFAULT_TEXT_TOKENS, call_flop_profile, flop_profile, tie_dit_embedders

from .conftest import bench_size, timed


@dataclass(frozen=True)
class Setup:
    key: str
    label: str
    cls: type
    config: dict[str, Any] = field(hash=False)
    batch: int
    steps: int
    dtype: torch.dtype
    guidance: float
    rounds: int
    text_tokens: int = 0
    latent_side: int = 0
    """Flow-matching families: image tokens per side."""
    distilled: bool = False
    """FLUX with a guidance embedding: ``guidance`` is a model input, no CFG rows."""
    init_in_dtype: bool = False
    """Initialise the weights in ``dtype`` (a 12B model initialised in fp32 needs 48 GB, then 24 more
    for the cast)."""

    @property
    def flow(self) -> bool:
        return self.cls not in (DiTTransformer2DModel, PixArtTransformer2DModel)


def _dit(heads: int, head_dim: int, layers: int, sample: int) -> dict[str, Any]:
    return dict(
        num_attention_heads=heads,
        attention_head_dim=head_dim,
        in_channels=4,
        out_channels=8,  # learned sigma, as DiT-XL/2
        num_layers=layers,
        sample_size=sample,
        patch_size=2,
    )


def _pixart(heads: int, head_dim: int, layers: int, sample: int, caption: int) -> dict[str, Any]:
    return dict(
        num_attention_heads=heads,
        attention_head_dim=head_dim,
        in_channels=4,
        out_channels=8,
        num_layers=layers,
        sample_size=sample,
        patch_size=2,
        cross_attention_dim=heads * head_dim,
        caption_channels=caption,
    )


def _flux(heads: int, head_dim: int, double: int, single: int, channels: int, text: int, pooled: int) -> dict:
    """FLUX.1's structure (guidance-distilled, as FLUX.1-dev); rotary axes split as FLUX's 16/56/56."""
    third = head_dim * 7 // 16 // 2 * 2
    return dict(
        patch_size=1,
        in_channels=channels,
        num_layers=double,
        num_single_layers=single,
        attention_head_dim=head_dim,
        num_attention_heads=heads,
        joint_attention_dim=text,
        pooled_projection_dim=pooled,
        guidance_embeds=True,
        axes_dims_rope=(head_dim - 2 * third, third, third),
    )


def _wan(heads: int, head_dim: int, layers: int, ffn: int, channels: int, text: int, freq: int) -> dict:
    """Wan 2.1's text-to-video structure (affine cross-attention norm, RMS q/k norm across heads)."""
    return dict(
        patch_size=(1, 2, 2),
        num_attention_heads=heads,
        attention_head_dim=head_dim,
        in_channels=channels,
        out_channels=channels,
        text_dim=text,
        freq_dim=freq,
        ffn_dim=ffn,
        num_layers=layers,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        rope_max_seq_len=64,
    )


F32, BF16 = torch.float32, torch.bfloat16
SETUPS: dict[str, tuple[Setup, ...]] = {
    "smoke": (
        Setup("dit-tiny", "tiny DiT (2 blocks, width 32, 16 tokens)", DiTTransformer2DModel,
              _dit(2, 16, 2, 8), batch=1, steps=4, dtype=F32, guidance=1.5, rounds=1),
        Setup("pixart-tiny", "tiny PixArt (2 blocks, width 32, 16 tokens, 6 text tokens)",
              PixArtTransformer2DModel, _pixart(2, 16, 2, 8, 24), batch=1, steps=4, dtype=F32,
              guidance=4.5, rounds=1, text_tokens=6),
        Setup("flux-tiny", "tiny FLUX.1 (2 double + 2 single blocks, width 32, 16 tokens, 6 text tokens)",
              FluxTransformer2DModel, _flux(2, 16, 2, 2, 8, 24, 16), batch=1, steps=4, dtype=F32,
              guidance=3.5, rounds=1, text_tokens=6, latent_side=4, distilled=True),
        Setup("wan-tiny", "tiny Wan 2.1 (2 blocks, width 32, 16 tokens, 6 text tokens)",
              WanTransformer3DModel, _wan(2, 16, 2, 64, 4, 24, 32), batch=1, steps=4, dtype=F32,
              guidance=5.0, rounds=1, text_tokens=6, latent_side=4),
    ),
    "cpu": (
        Setup("dit-s-256", "DiT-S/2 256² (12 blocks, width 384, 256 tokens)", DiTTransformer2DModel,
              _dit(6, 64, 12, 32), batch=2, steps=10, dtype=F32, guidance=1.5, rounds=5),
        Setup("pixart-s-256", "PixArt-α-shaped S/2 256² (12 blocks, width 384, 256 tokens, 120 text tokens)",
              PixArtTransformer2DModel, _pixart(6, 64, 12, 32, 4096), batch=2, steps=10, dtype=F32,
              guidance=4.5, rounds=5, text_tokens=120),
        Setup("flux-s-256", "FLUX.1-shaped S 256² (4 double + 8 single blocks, width 384, 256 tokens, "
              "64 text tokens)", FluxTransformer2DModel, _flux(6, 64, 4, 8, 64, 4096, 768), batch=2,
              steps=10, dtype=F32, guidance=3.5, rounds=5, text_tokens=64, latent_side=16, distilled=True),
        Setup("wan-s-256", "Wan-2.1-shaped S 256² (12 blocks, width 384, 256 tokens, 64 text tokens)",
              WanTransformer3DModel, _wan(6, 64, 12, 1536, 16, 4096, 256), batch=2, steps=10, dtype=F32,
              guidance=5.0, rounds=5, text_tokens=64, latent_side=16),
    ),
    "gpu": (
        Setup("dit-xl-256", "DiT-XL/2 256² (28 blocks, width 1152, 256 tokens)", DiTTransformer2DModel,
              _dit(16, 72, 28, 32), batch=8, steps=20, dtype=BF16, guidance=1.5, rounds=5),
        Setup("pixart-alpha-1024", "PixArt-α 1024² (28 blocks, width 1152, 4096 tokens, 120 text tokens)",
              PixArtTransformer2DModel, _pixart(16, 72, 28, 128, 4096), batch=1, steps=20, dtype=BF16,
              guidance=4.5, rounds=3, text_tokens=120),
        # FLUX.1-dev's width and depth (11.9B parameters, random weights) at 512²: its own stage of
        # gpu_check.sh (e2e_flux), after the DiT and PixArt rows.
        Setup("flux1-512", "FLUX.1 width and depth 512² (19 double + 38 single blocks, width 3072, "
              "1024 tokens, 512 text tokens)", FluxTransformer2DModel, _flux(24, 128, 19, 38, 64, 4096, 768),
              batch=1, steps=10, dtype=BF16, guidance=3.5, rounds=3, text_tokens=512, latent_side=32,
              distilled=True, init_in_dtype=True),
    ),
}  # fmt: skip
SIZE_SETUPS = SETUPS[bench_size()]

VARIANTS = {
    "uncached": "unpatched diffusers model",
    "full": "CacheSchedule.full",
    "fora2": "FORA N=2",
    "fora3": "FORA N=3",
    "forecast3": "FORA N=3, order-2 forecasting (TaylorSeer's static form)",
    "mask37": "from_mask, CUR 37.5 %",
}
MODES = ("eager", "graph") if torch.cuda.is_available() else ("eager",)
TARGET_CUR = 0.375


def mask_schedule(num_steps: int, num_units: int, cur: float = TARGET_CUR, seed: int = 0) -> CacheSchedule:
    """Row 0 computes every unit; the ``round(cur · T · U)`` reused (step, unit) pairs are spread as
    evenly as possible over steps 1..T-1, the units of each step drawn at random (fixed seed)."""
    reused = round(cur * num_steps * num_units)
    later = num_steps - 1
    if reused > later * num_units:
        raise ValueError(f"cannot reuse {reused} of {num_steps}x{num_units} pairs with row 0 computed")
    generator = torch.Generator().manual_seed(seed)
    mask = torch.ones(num_steps, num_units, dtype=torch.bool)
    for step in range(1, num_steps):
        count = reused // later + (1 if step - 1 < reused % later else 0)
        mask[step, torch.randperm(num_units, generator=generator)[:count]] = False
    return CacheSchedule.from_mask(mask)


def make_schedule(variant: str, num_steps: int, num_units: int) -> CacheSchedule | None:
    if variant == "uncached":
        return None
    if variant == "full":
        return CacheSchedule.full(num_steps, num_units)
    if variant.startswith("fora"):
        return CacheSchedule.fora(num_steps, num_units, int(variant[4:]))
    if variant.startswith("forecast"):
        return CacheSchedule.fora(num_steps, num_units, int(variant[8:]), order=2)
    return mask_schedule(num_steps, num_units)


class Bench:
    """A model of one setup with fixed inputs, sampled eagerly or through a captured CUDA graph."""

    def __init__(self, setup: Setup, device: str) -> None:
        self.setup = setup
        self.device = device
        torch.manual_seed(0)
        default_dtype = torch.get_default_dtype()
        try:
            if setup.init_in_dtype:
                torch.set_default_dtype(setup.dtype)
            with torch.device(device):  # initialise on the device: DiT-XL/2 on a CPU takes seconds
                model = setup.cls(**setup.config)
        finally:
            torch.set_default_dtype(default_dtype)
        if setup.cls is DiTTransformer2DModel:
            tie_dit_embedders(model)  # the structure of the released DiT checkpoints
        self.model = model.to(device=device, dtype=setup.dtype).eval().requires_grad_(False)
        self.uncached_graph: Any = None
        self.uncached_output: torch.Tensor | None = None
        self._twin: torch.nn.Module | None = None
        self.num_units = len(units(self.model))
        self.rows_per_call = setup.batch if setup.distilled else 2 * setup.batch
        if setup.flow:
            self._init_flow(setup, device)
            return
        config = self.model.config
        self.channels = config.in_channels
        self.sample = config.sample_size
        self.tokens = (self.sample // config.patch_size) ** 2
        self.latent = [self.channels, self.sample, self.sample]
        self.text_tokens = setup.text_tokens or DEFAULT_TEXT_TOKENS
        self.profile = flop_profile(self.model, text_tokens=self.text_tokens)

        B = setup.batch
        generator = torch.Generator().manual_seed(0)
        self.noise = torch.randn(B, self.channels, self.sample, self.sample, generator=generator)
        self.noise = self.noise.to(device=device, dtype=setup.dtype)
        self.scheduler = DDIMScheduler(num_train_timesteps=1000, clip_sample=False)
        self.scheduler.set_timesteps(setup.steps)
        # Model inputs on the device; the scheduler keeps its CPU timesteps (CPU scalars in its
        # update are kernel arguments, not device reads, so the loop never waits on the device).
        self.model_timesteps = self.scheduler.timesteps.to(device)
        if setup.cls is DiTTransformer2DModel:
            labels = torch.randint(0, 1000, (B,), generator=generator)
            null = torch.full_like(labels, config.num_embeds_ada_norm)
            self.conditions = {"class_labels": torch.cat([labels, null]).to(device)}
        else:
            text = torch.randn(2 * B, setup.text_tokens, config.caption_channels, generator=generator)
            micro = {"resolution": None, "aspect_ratio": None}
            if self.model.use_additional_conditions:
                side = float(8 * self.sample)  # pixels: the VAE downsamples 8x
                micro = {
                    "resolution": torch.tensor([[side, side]] * 2 * B, device=device, dtype=setup.dtype),
                    "aspect_ratio": torch.tensor([[1.0]] * 2 * B, device=device, dtype=setup.dtype),
                }
            self.conditions = {
                "encoder_hidden_states": text.to(device=device, dtype=setup.dtype),
                "encoder_attention_mask": torch.ones(2 * B, setup.text_tokens, device=device),
                "added_cond_kwargs": micro,
            }

    def _init_flow(self, setup: Setup, device: str) -> None:
        """Latents, prompts (CFG-batched against a zero prompt unless distilled), sigmas and the
        FLOP profile of a flow-matching family at this resolution."""
        model, B = self.model, setup.batch
        config = model.config
        self.adapter = adapter_for(model)
        shape = self.adapter.noise_shape(model, setup.latent_side)
        self.tokens = setup.latent_side**2
        self.latent = list(shape)
        self.text_tokens = setup.text_tokens
        generator = torch.Generator().manual_seed(0)
        on = dict(device=device, dtype=setup.dtype)
        self.noise = torch.randn(B, *shape, generator=generator).to(**on)
        width = getattr(config, "joint_attention_dim", None) or config.text_dim
        text = torch.randn(B, setup.text_tokens, width, generator=generator)
        pooled_dim = getattr(config, "pooled_projection_dim", None)
        pooled = torch.randn(B, pooled_dim, generator=generator) if pooled_dim else None
        if not setup.distilled:  # true CFG: the unconditional half is the zero prompt
            text = torch.cat([text, torch.zeros_like(text)])
            pooled = None if pooled is None else torch.cat([pooled, torch.zeros_like(pooled)])
        self.text = text.to(**on)
        self.pooled = None if pooled is None else pooled.to(**on)
        self.scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
        self.scheduler.set_timesteps(setup.steps)
        self.sigmas = self.scheduler.sigmas.tolist()  # host floats: kernel arguments, no device reads
        self.model_timesteps = self.scheduler.timesteps.to(device=device, dtype=setup.dtype)
        self.profile = call_flop_profile(
            model,
            lambda: self.adapter.predict(
                model,
                self.noise[:1],
                self.model_timesteps[:1],
                self.text[:1],
                None if self.pooled is None else self.pooled[:1],
                self._distilled_guidance(),
            ),
            self.tokens,
        )

    def _distilled_guidance(self) -> float | None:
        return self.setup.guidance if self.setup.distilled else None

    @property
    def group(self) -> str:
        s = self.setup
        if not s.flow:
            return f"{s.label}, {s.steps} DDIM steps, batch {s.batch}+CFG, {str(s.dtype)[6:]}"
        guidance = (
            f"batch {s.batch}, guidance {s.guidance:g} as input" if s.distilled else f"batch {s.batch}+CFG"
        )
        return f"{s.label}, {s.steps} flow-matching Euler steps, {guidance}, {str(s.dtype)[6:]}"

    @torch.inference_mode()
    def generate(self, model: torch.nn.Module | None = None) -> torch.Tensor:
        """One sampling run of ``model`` (default: the bench's) from the fixed noise; final latents."""
        model = self.model if model is None else model
        _reset(model)
        x = self.noise
        for i in range(self.setup.steps):
            x = self.step(model, x, i)
        return x

    def step(self, model: torch.nn.Module, x: torch.Tensor, i: int) -> torch.Tensor:
        """Denoising step ``i`` of ``model`` from latents ``x`` (one CFG-batched call, DDIM update;
        flow-matching families: the family's call, then the Euler update)."""
        if self.setup.flow:
            return self._flow_step(model, x, i)
        B, C = self.setup.batch, self.channels
        t_in = self.model_timesteps[i].expand(2 * B)
        out = model(torch.cat([x, x]), timestep=t_in, **self.conditions).sample
        cond, uncond = out[:, :C].split(B)  # learned sigma: the first C channels are epsilon
        t = self.scheduler.timesteps[i]
        return self.scheduler.step(uncond + self.setup.guidance * (cond - uncond), t, x).prev_sample

    def _flow_step(self, model: torch.nn.Module, x: torch.Tensor, i: int) -> torch.Tensor:
        """``FlowMatchEulerDiscreteScheduler.step`` without its step counter (two loops run in
        lockstep): ``x + (σ_{i+1} − σ_i) · v`` in fp32, v the (guided) velocity."""
        setup = self.setup
        cfg = not setup.distilled
        t_in = self.model_timesteps[i].expand(self.rows_per_call)
        x_in = torch.cat([x, x]) if cfg else x
        v = self.adapter.predict(model, x_in, t_in, self.text, self.pooled, self._distilled_guidance())
        if cfg:
            cond, uncond = v.split(setup.batch)
            v = uncond + setup.guidance * (cond - uncond)
        return (x.float() + (self.sigmas[i + 1] - self.sigmas[i]) * v.float()).to(x.dtype)

    def ideal_speedup(self, schedule: CacheSchedule) -> float:
        """The schedule's FLOP-ideal speedup at this benchmark's resolution."""
        if not self.setup.flow:
            return schedule.ideal_speedup(self.model, text_tokens=self.text_tokens)
        p = self.profile
        computed = (schedule.compute.double() * torch.tensor(p.units, dtype=torch.float64)).sum().item()
        return schedule.num_steps * p.total / (schedule.num_steps * p.always + computed)

    @torch.inference_mode()
    def generate_lockstep(self, cached: torch.nn.Module) -> tuple[torch.Tensor, float, float]:
        """Sample with the unpatched model and ``cached`` side by side, one step of each in turn.

        Returns ``(cached final latents, uncached seconds, cached seconds)``: each call's time on
        its own (eager CPU only: nothing is left running when a call returns), the order of the
        two calls alternating from step to step so neither always runs on a warmer machine.
        """
        _reset(cached)
        x_plain = x_cached = self.noise
        plain_s = cached_s = 0.0
        for i in range(self.setup.steps):
            if i % 2:
                x_cached, seconds = timed(partial(self.step, cached, x_cached, i), self.device)
                cached_s += seconds
            x_plain, seconds = timed(partial(self.step, self.model, x_plain, i), self.device)
            plain_s += seconds
            if not i % 2:
                x_cached, seconds = timed(partial(self.step, cached, x_cached, i), self.device)
                cached_s += seconds
        return x_cached, plain_s, cached_s

    def ops_per_run(self, model: torch.nn.Module) -> int:
        """Ops that are not views in one eager sampling run of ``model`` (≈ kernel launches on a GPU)."""
        with OpCounter() as counter:
            self.generate(model)
        return counter.count

    def twin(self) -> torch.nn.Module:
        """A second unpatched copy of the model (same weights) for lockstep pairing."""
        if self._twin is None:
            self._twin = copy.deepcopy(self.model)
        return self._twin

    def capture(self) -> tuple[Any, torch.Tensor]:
        """``(replay, eager output)``: the whole sampling run, for the current state of the model
        (cached or not), captured as one CUDA graph and replayed once; ``replay()`` reruns it and
        returns its (static) output. The eager output is that of the warm-up run before capture."""
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # warm-up: lazy init, library handles, kernel selection
            eager = self.generate().clone()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_out = self.generate()

        def replay() -> torch.Tensor:
            graph.replay()
            return static_out

        replay.graph = graph  # the graph lives as long as its replay function
        replay()  # capture records kernels without running them: fill the output once
        torch.cuda.synchronize()
        return replay, eager

    def reference(self) -> torch.Tensor:
        """Final latents of the uncached eager run (computed once)."""
        if self.uncached_output is None:
            disable_cache(self.model)
            self.uncached_output = self.generate().clone()
        return self.uncached_output

    def uncached_replay(self):
        if self.uncached_graph is None:
            disable_cache(self.model)
            self.uncached_graph, _ = self.capture()
        return self.uncached_graph

    def flops(self, schedule: CacheSchedule | None) -> int:
        """FLOPs of one sampling run (every row of every step, guidance rows included)."""
        p = self.profile
        per_row = self.setup.steps * p.total
        if schedule is not None:
            unit_flops = torch.tensor(p.units, dtype=torch.float64)
            per_row = self.setup.steps * p.always + (schedule.compute.double() * unit_flops).sum().item()
        return int(self.rows_per_call * per_row)

    def close(self) -> None:
        disable_cache(self.model)
        self.uncached_graph = None
        self._twin = None


class OpCounter(TorchDispatchMode):
    """Counts the ATen and harmonica ops run under it, views excluded (they launch nothing)."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += not func.is_view
        return func(*args, **(kwargs or {}))


def _reset(model: torch.nn.Module) -> None:
    handle = getattr(model, "_harmonica_cache", None)
    if handle is not None:
        handle.reset()


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30)).item()


@pytest.fixture(scope="module", params=[s.key for s in SIZE_SETUPS])
def bench(request, device):
    setup = next(s for s in SIZE_SETUPS if s.key == request.param)
    b = Bench(setup, device)
    yield b
    b.close()
    del b
    if device == "cuda":
        torch.cuda.empty_cache()


@pytest.mark.parametrize(("mode", "variant"), [(m, v) for m in MODES for v in VARIANTS])
def test_sampling(benchmark, recorder, bench, device, mode, variant):
    setup, model = bench.setup, bench.model
    if setup.flow and variant == "mask37":
        pytest.skip("mask37 is HarmoniCa's DiT-XL/2 usage figure; not run on the flow-matching families")
    schedule = make_schedule(variant, setup.steps, bench.num_units)
    benchmark.group = f"{bench.group} [{mode}]"
    base_seconds: list[float] = []
    seconds: list[float] = []
    extra: dict[str, Any] = {}
    disable_cache(model)

    baseline_round = None  # the eager uncached row is the baseline itself
    cached_model = model
    lockstep = mode == "eager" and schedule is not None and device == "cpu"
    if lockstep:
        cached_model = bench.twin()
        enable_cache(cached_model, schedule)

        def candidate():
            out, plain_s, cached_s = bench.generate_lockstep(cached_model)
            base_seconds.append(plain_s)
            return out, cached_s

    elif mode == "eager":
        candidate = bench.generate
        if schedule is not None:

            def baseline_round():
                disable_cache(model)
                base_seconds.append(timed(bench.generate, device)[1])
                enable_cache(model, schedule)
                return (), {}

    else:
        uncached_replay = bench.uncached_replay()
        if schedule is None:  # what capture alone gains over the eager model
            candidate = uncached_replay
            extra["graph_rel_err_vs_eager"] = relative_error(uncached_replay(), bench.reference())

            def baseline_round():
                base_seconds.append(timed(bench.generate, device)[1])
                return (), {}

        else:
            enable_cache(model, schedule)
            candidate, eager = bench.capture()
            extra["graph_rel_err_vs_eager"] = relative_error(candidate(), eager)

            def baseline_round():
                base_seconds.append(timed(uncached_replay, device)[1])
                return (), {}

    def run():
        out, s = candidate() if lockstep else timed(candidate, device)
        seconds.append(s)
        return out

    try:
        benchmark.pedantic(run, setup=baseline_round, rounds=setup.rounds, warmup_rounds=1)
        if benchmark.disabled:
            return
        output = run().clone()
        handle = getattr(cached_model, "_harmonica_cache", None)
        cache_bytes = handle.cache_bytes if handle is not None else 0
        if mode == "eager":
            extra["ops_per_run"] = bench.ops_per_run(cached_model)
    finally:
        disable_cache(model)
        disable_cache(cached_model)
    seconds = seconds[1 : 1 + setup.rounds]  # the warm-up round and the final run are not timed
    base_seconds = base_seconds[1 : 1 + setup.rounds] if lockstep else base_seconds[-setup.rounds :]
    median = statistics.median(seconds)
    flops = bench.flops(schedule)
    row: dict[str, Any] = {
        "group": bench.group,
        "impl": f"{variant} ({mode})",
        "setup": setup.key,
        "model": setup.cls.__name__,
        "label": setup.label,
        "blocks": len(adapter_for(model).blocks(model)),
        "width": adapter_for(model).width(model),
        "tokens": bench.tokens,
        "text_tokens": setup.text_tokens or None,
        "units": bench.num_units,
        "latent": bench.latent,
        "batch": setup.batch,
        "cfg": not setup.distilled,
        "rows_per_call": bench.rows_per_call,
        "steps": setup.steps,
        "sampler": "flow-matching Euler" if setup.flow else "DDIM",
        "dtype": str(setup.dtype)[6:],
        "device": device,
        "backend": hk.get_backend(device),
        "threads": torch.get_num_threads(),
        "mode": mode,
        "schedule": variant,
        "schedule_desc": VARIANTS[variant],
        "cache_usage_ratio": schedule.cache_usage_ratio if schedule is not None else 0.0,
        "distinct_rows": len(set(schedule.rows)) if schedule is not None else 1,
        "rounds": setup.rounds,
        "times_s": seconds,
        "median_s": median,
        "flops": flops,
        "flops_uncached": bench.flops(None),
        "tflops_per_s": flops / median / 1e12,
        "cache_bytes": cache_bytes,
        "rel_err_vs_uncached": relative_error(output, bench.reference()),
        **extra,
    }
    if base_seconds:
        baseline_median = statistics.median(base_seconds)
        speedups = [b / c for b, c in zip(base_seconds, seconds, strict=True)]
        row.update(
            uncached_median_s=baseline_median,
            uncached_times_s=base_seconds,
            pairing="lockstep" if lockstep else "rounds",
            speedups=speedups,
            speedup=statistics.median(speedups),
            speedup_vs="uncached eager" if mode == "eager" or schedule is None else "uncached graph",
        )
    else:
        row.update(baseline=True, speedup=1.0, speedup_vs="itself")
    if schedule is not None:
        ideal = bench.ideal_speedup(schedule)
        row.update(ideal_speedup=ideal, pct_of_ideal=100 * row["speedup"] / ideal)
    benchmark.extra_info.update({k: v for k, v in row.items() if not isinstance(v, list)})
    recorder.add("e2e", row)


@pytest.mark.skipif(bench_size() != "smoke", reason="a check of the profiling script, at smoke size only")
def test_profile_script(device):
    """``benchmarks/profile_e2e.py`` profiles a computing and a reusing step of each model, and the
    reusing step issues fewer ops (the engine really skips the units)."""
    from .profile_e2e import profile_run

    for setup in SIZE_SETUPS:
        bench = Bench(setup, device)
        computing, reusing = profile_run(bench, top=200)
        bench.close()
        assert (computing.step, computing.reused) == (0, 0)
        assert (reusing.step, reusing.reused) == (1, bench.num_units)
        assert 0 < reusing.ops < computing.ops
        assert (reusing.kernels > 0) == (device == "cuda")
        assert "harmonica::cached_gated_residual" in reusing.table
        assert "harmonica::cached_gated_residual" not in computing.table


def test_flux1_setup_has_flux1_dev_width_and_depth():
    """The GPU row named FLUX.1 is FLUX.1-dev's architecture (built on the meta device: no memory)."""
    setup = next(s for s in SETUPS["gpu"] if s.key == "flux1-512")
    with torch.device("meta"):
        model = setup.cls(**setup.config)
    assert (len(model.transformer_blocks), len(model.single_transformer_blocks)) == (19, 38)
    assert model.inner_dim == 3072 and model.config.guidance_embeds
    assert 11.85e9 < sum(p.numel() for p in model.parameters()) < 11.95e9
