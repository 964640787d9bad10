"""diffusers' own FLUX, SD3 and Qwen-Image pipelines (no text encoders or VAE: prompt embeddings in,
latents out) driving tiny cached transformers: FLUX's and Qwen-Image's true CFG run as two
transformer calls per step, SD3's is batched into one."""

from __future__ import annotations

import inspect

import pytest
import torch
from diffusers import (
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    QwenImagePipeline,
    StableDiffusion3Pipeline,
)

from harmonica import CacheSchedule, disable_cache, enable_cache, units

from .family_models import ReplayOracle, prompts, tiny

STEPS = 5
FP32 = dict(rtol=1e-5, atol=1e-5)


def _pipeline(kind: str):
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    text, pooled = prompts(1)
    none = dict(vae=None, text_encoder=None, tokenizer=None)
    if kind == "flux":
        pipe = FluxPipeline(
            scheduler=scheduler, transformer=tiny(kind), text_encoder_2=None, tokenizer_2=None, **none
        )
        inputs = dict(
            prompt_embeds=text,
            pooled_prompt_embeds=pooled,
            negative_prompt_embeds=torch.zeros_like(text),
            negative_pooled_prompt_embeds=torch.zeros_like(pooled),
            true_cfg_scale=2.0,
        )
        calls = 2
    elif kind == "sd3":
        pipe = StableDiffusion3Pipeline(
            scheduler=scheduler,
            transformer=tiny(kind),
            text_encoder_2=None,
            tokenizer_2=None,
            text_encoder_3=None,
            tokenizer_3=None,
            **none,
        )
        inputs = dict(
            prompt_embeds=text,
            pooled_prompt_embeds=pooled,
            negative_prompt_embeds=torch.zeros_like(text),
            negative_pooled_prompt_embeds=torch.zeros_like(pooled),
            guidance_scale=3.0,
        )
        calls = 1
    else:
        pipe = QwenImagePipeline(scheduler=scheduler, transformer=tiny(kind), **none)
        mask = torch.ones(1, text.shape[1], dtype=torch.long)
        inputs = dict(
            prompt_embeds=text,
            prompt_embeds_mask=mask,
            negative_prompt_embeds=torch.zeros_like(text),
            negative_prompt_embeds_mask=mask,
            true_cfg_scale=3.0,
        )
        calls = 2
    pipe.set_progress_bar_config(disable=True)
    return pipe, inputs, calls


def _run(pipe, inputs, steps: int = STEPS):
    generator = torch.Generator().manual_seed(0)
    return pipe(
        **inputs, num_inference_steps=steps, height=64, width=64, output_type="latent", generator=generator
    ).images


@pytest.mark.parametrize("kind", ["flux", "sd3", "qwen"])
def test_diffusers_pipeline_matches_replay_oracle(kind):
    pipe, inputs, calls = _pipeline(kind)
    signature = inspect.signature(pipe.scheduler.set_timesteps)
    schedule = CacheSchedule.fora(STEPS, len(units(pipe.transformer)), 2)
    with torch.no_grad():
        stock = _run(pipe, inputs)
        oracle = ReplayOracle(kind, pipe.transformer, schedule.compute, calls)
        expected = _run(pipe, inputs)
        oracle.remove()
        handle = enable_cache(pipe, schedule)
        # FLUX's and Qwen-Image's pipelines pass sigmas= only to a set_timesteps that takes them
        assert inspect.signature(pipe.scheduler.set_timesteps) == signature
        got = _run(pipe, inputs)
        assert handle.step == STEPS
        again = _run(pipe, inputs)
        with pytest.raises(ValueError, match=f"made for {STEPS} denoising steps"):
            _run(pipe, inputs, steps=STEPS + 1)
        disable_cache(pipe)
        restored = _run(pipe, inputs)
    torch.testing.assert_close(got, expected, **FP32)
    assert torch.equal(got, again)
    assert "set_timesteps" not in pipe.scheduler.__dict__
    assert torch.equal(restored, stock)
