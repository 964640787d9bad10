#!/usr/bin/env bash
# The committed compare run on the flow-matching reference model (docs/compare-flow): an SD3
# transformer trained by rectified flow on the digits (python -m harmonica.reference.flow), sampled
# with FlowMatchEulerDiscreteScheduler over its digit prompt pool, true CFG 1.5, T = 20.
set -euo pipefail
F=python/harmonica/reference/assets/sd3-digits
R=python/harmonica/reference/assets/routers
harmonica compare --model "$F" --prompt-embeds "$F/prompts.safetensors" --threads 2 --out docs/compare-flow \
  --no-progress --num-samples 100 \
  --methods fora,forecast,fitted,taylorseer,fbcache,magcache \
  --sweep fora=2,3 --sweep steps=0.45 --sweep forecast=2,3,4 --sweep step=2,3,4 --sweep fitted=2,3,4 \
  --sweep taylorseer=2,3,4 \
  --router "HarmoniCa forecast+exchanges 45%=$R/sd3-harmonica-forecast-T20-45.safetensors"
