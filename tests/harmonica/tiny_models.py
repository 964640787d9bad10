"""Tiny random DiT / PixArt models, pipelines and an independent METHOD.md §1 oracle for the tests."""

from __future__ import annotations

import functools

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    DiTPipeline,
    DiTTransformer2DModel,
    PixArtAlphaPipeline,
    PixArtTransformer2DModel,
)

LATENT = 8
CHANNELS = 4
TEXT_TOKENS = 5
CAPTION_CHANNELS = 24


def tiny_dit(num_layers: int = 2, seed: int = 0, **overrides) -> DiTTransformer2DModel:
    """DiT with 2 heads × 16 = width 32, 8×8 latents, patch 2 (16 tokens), learned sigma.

    ``num_embeds_ada_norm=1000`` because DiTPipeline hard-codes the null class id 1000.
    """
    torch.manual_seed(seed)
    config = dict(
        num_attention_heads=2,
        attention_head_dim=16,
        in_channels=CHANNELS,
        out_channels=2 * CHANNELS,
        num_layers=num_layers,
        sample_size=LATENT,
        patch_size=2,
        num_embeds_ada_norm=1000,
    )
    config.update(overrides)
    return DiTTransformer2DModel(**config).eval()


def tiny_pixart(num_layers: int = 2, seed: int = 0, **overrides) -> PixArtTransformer2DModel:
    """PixArt with width 32, cross-attention to 24-channel captions, 8×8 latents, learned sigma."""
    torch.manual_seed(seed)
    config = dict(
        num_attention_heads=2,
        attention_head_dim=16,
        in_channels=CHANNELS,
        out_channels=2 * CHANNELS,
        num_layers=num_layers,
        sample_size=LATENT,
        patch_size=2,
        cross_attention_dim=32,
        caption_channels=CAPTION_CHANNELS,
    )
    config.update(overrides)
    return PixArtTransformer2DModel(**config).eval()


def tiny_vae(**overrides) -> AutoencoderKL:
    """A 2-level AutoencoderKL (scale factor 2) with 4 latent channels (``overrides``: its config)."""
    torch.manual_seed(0)
    config = dict(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(8, 8),
        layers_per_block=1,
        norm_num_groups=4,
        latent_channels=CHANNELS,
        sample_size=2 * LATENT,
    )
    config.update(overrides)
    return AutoencoderKL(**config).eval()


def ddim() -> DDIMScheduler:
    return DDIMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", clip_sample=False)


def dit_pipeline(transformer: DiTTransformer2DModel | None = None) -> DiTPipeline:
    return DiTPipeline(transformer=transformer or tiny_dit(), vae=tiny_vae(), scheduler=ddim())


def pixart_pipeline(transformer: PixArtTransformer2DModel | None = None) -> PixArtAlphaPipeline:
    return PixArtAlphaPipeline(
        tokenizer=None,
        text_encoder=None,
        vae=tiny_vae(),
        transformer=transformer or tiny_pixart(),
        scheduler=ddim(),
    )


def prompt_kwargs(batch: int, seed: int = 0) -> dict:
    """``prompt_embeds`` (and negatives) for PixArtAlphaPipeline, so no text encoder is needed."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(batch, TEXT_TOKENS, dtype=torch.long)
    mask[:, -1] = 0  # a padded token, so the cross-attention mask matters
    return dict(
        prompt_embeds=torch.randn(batch, TEXT_TOKENS, CAPTION_CHANNELS, generator=g),
        prompt_attention_mask=mask,
        negative_prompt_embeds=torch.randn(batch, TEXT_TOKENS, CAPTION_CHANNELS, generator=g),
        negative_prompt_attention_mask=mask.clone(),
        negative_prompt=None,
        use_resolution_binning=False,
    )


def sample(
    model, scheduler, noise, cond, num_steps: int, guidance: float = 1.5, text_mask=None
) -> torch.Tensor:
    """A bare DDIM loop with classifier-free guidance batched into one transformer call per step.

    ``cond``: class labels [B] (DiT; null class = 1000) or caption embeddings [B, L, C] (PixArt,
    the unconditional half gets zeros).
    """
    scheduler.set_timesteps(num_steps)
    x = noise
    batch = noise.shape[0]
    use_cfg = guidance > 1
    for t in scheduler.timesteps:
        inp = torch.cat([x, x]) if use_cfg else x
        timestep = t.expand(inp.shape[0])
        if isinstance(getattr(model, "_orig_mod", model), DiTTransformer2DModel):  # also under torch.compile
            labels = torch.cat([cond, torch.full_like(cond, 1000)]) if use_cfg else cond
            out = model(inp, timestep=timestep, class_labels=labels).sample
        else:
            text = torch.cat([cond, torch.zeros_like(cond)]) if use_cfg else cond
            mask = (
                None if text_mask is None else (torch.cat([text_mask, text_mask]) if use_cfg else text_mask)
            )
            out = model(
                inp,
                encoder_hidden_states=text,
                encoder_attention_mask=mask,
                timestep=timestep,
                added_cond_kwargs={"resolution": None, "aspect_ratio": None},
            ).sample
        eps = out[:, :CHANNELS]
        if use_cfg:
            cond_eps, uncond_eps = eps.split(batch)
            eps = uncond_eps + guidance * (cond_eps - uncond_eps)
        x = scheduler.step(eps, t, x).prev_sample
    return x


class ReferenceCache:
    """METHOD.md §1 on an *unpatched* diffusers transformer, with forward hooks and its own cache.

    Each unit module (``attn1``, ``attn2``, ``ff`` of every block) still runs, but on a reuse step
    its output is replaced by the cached output of the last step that computed it; diffusers' own
    block code then applies the current step's gate and residual. Independent of harmonica.cache.

    Forecasting (``orders`` given): a forecast entry's output is extrapolated from the unit's
    stored outputs: with ``coefficients`` as ``c0 + a(c0 − c1) + b(c0 − 2c1 + c2)``; with
    ``rule="taylor"`` by TaylorSeer's recursion (each order's backward difference divided by the
    latest distance, a Taylor series around the newest compute); with ``rule="newton"`` by Lagrange
    interpolation through the last order + 1 computed points. With ``fit_ridge``, each forecast
    entry's coefficients are first solved by ridge least squares against the module's true output on
    this (cached) run, in place in ``coefficients``.
    """

    def __init__(
        self,
        model,
        compute: torch.Tensor,
        cache_dtype: torch.dtype | None = None,
        orders: torch.Tensor | None = None,
        rule: str = "taylor",
        coefficients: torch.Tensor | None = None,
        fit_ridge: float | None = None,
    ) -> None:
        self.compute = compute.tolist()
        self.orders = orders.tolist() if orders is not None else None
        self.rule = rule
        self.coefficients = coefficients
        self.fit_ridge = fit_ridge
        self.cache_dtype = cache_dtype
        self.step = -1
        self.cache: dict[int, torch.Tensor] = {}
        self.history: dict[int, list[tuple[int, torch.Tensor]]] = {}
        self.hooks = [model.register_forward_pre_hook(self._next_step)]
        self.names = []
        for i, block in enumerate(model.transformer_blocks):
            for branch in ("attn1", "attn2", "ff"):
                module = getattr(block, branch, None)
                if module is None:
                    continue
                name = f"blocks.{i}.{branch}"
                self.hooks.append(
                    module.register_forward_hook(functools.partial(self._unit, len(self.names)))
                )
                self.names.append(name)

    def reset(self) -> None:
        self.step = -1
        self.cache.clear()
        self.history.clear()

    def remove(self) -> None:
        for hook in self.hooks:
            hook.remove()

    def _next_step(self, module, args) -> None:
        self.step += 1

    def _unit(self, k: int, module, args, output: torch.Tensor) -> torch.Tensor:
        if self.compute[self.step][k]:
            self.cache[k] = output.detach().to(self.cache_dtype or output.dtype, copy=True)
            self.history.setdefault(k, []).insert(0, (self.step, self.cache[k]))
            return output
        order = self.orders[self.step][k] if self.orders is not None else 0
        if order == 0:
            return self.cache[k].to(output.dtype)
        if self.fit_ridge is not None:
            self._fit(k, order, output.detach().double())
        return self._forecast(k, order).to(output.dtype)

    def _fit(self, k: int, order: int, output: torch.Tensor) -> None:
        """Least squares for this entry's (a, b) against the module's true output, ridge towards the
        coefficients already in the table (the rule's), written into the table."""
        c = [c.double() for _, c in self.history[k][: order + 1]]
        features = [c[0] - c[1]] if order == 1 else [c[0] - c[1], c[0] - 2 * c[1] + c[2]]
        X = torch.stack([f.flatten() for f in features], dim=1)
        y = (output - c[0]).flatten()
        gram = X.T @ X
        mu = self.fit_ridge * gram.diagonal().mean()
        prior = self.coefficients[self.step, k, :order]
        solved = torch.linalg.solve(gram + mu * torch.eye(order, dtype=gram.dtype), X.T @ y + mu * prior)
        self.coefficients[self.step, k, :order] = solved

    def _forecast(self, k: int, order: int) -> torch.Tensor:
        points = [(s, c.double()) for s, c in self.history[k][: order + 1]]
        t = self.step
        if self.coefficients is not None:
            a, b = self.coefficients[t, k].tolist()
            c0, c1 = points[0][1], points[1][1]
            c2 = points[2][1] if order == 2 else c1  # b is 0 at order 1
            return c0 + a * (c0 - c1) + b * (c0 - 2 * c1 + c2)
        if self.rule == "taylor":
            (s0, c0), (s1, c1) = points[0], points[1]
            d1 = (c0 - c1) / (s0 - s1)
            out = c0 + (t - s0) * d1
            if order == 2:
                s2, c2 = points[2]
                d2 = (d1 - (c1 - c2) / (s1 - s2)) / (s0 - s1)
                out = out + (t - s0) ** 2 / 2 * d2
            return out
        out = torch.zeros_like(points[0][1])
        for i, (si, ci) in enumerate(points):
            weight = 1.0
            for j, (sj, _) in enumerate(points):
                if j != i:
                    weight *= (t - sj) / (si - sj)
            out = out + weight * ci
        return out
