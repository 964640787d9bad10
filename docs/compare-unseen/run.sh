#!/usr/bin/env bash
# Forecasting on a digits DiT this project never tuned on (the reference recipe, seed 7, 1 500 training
# steps: python -m harmonica.reference.train --out MODEL --steps 1500 --seed 7): plain FORA, static
# forecasting (the rule's default blend; the rule in step index or in the sampler's log-SNR alone),
# forecasting with coefficients fitted on that model, every peer (diffusers' TaylorSeer, FirstBlockCache, MagCache, PAB; cache-dit's
# DBCache, at the default sweep), and routers trained on that model with train_router's defaults
# (routers/: harmonica train --model MODEL --target-cur 0.45 / 0.55 --threads 2 --out ...). The model's
# training is not bit-reproducible across machines (the committed PSNRs moved by up to 0.2 dB between
# retrained copies): on a new copy, retrain the routers too.
set -euo pipefail
M=${1:?model folder}; OUT=${2:-docs/compare-unseen}
R=docs/compare-unseen/routers
harmonica compare --model "$M" --threads 2 --out "$OUT" --no-progress --num-samples 100 --timing-repeats 5 \
  --methods fora,forecast,step,lsnr,fitted,taylorseer,fbcache,magcache,pab,dbcache \
  --sweep fora=2,3,4 --sweep forecast=2,3,4 --sweep step=2,3,4 --sweep lsnr=2,3,4 --sweep fitted=2,3,4 --sweep taylorseer=2,3,4 \
  --router "HarmoniCa forecast+exchanges 45%=$R/harmonica-forecast-T20-45.safetensors" \
  --router "HarmoniCa forecast+exchanges 55%=$R/harmonica-forecast-T20-55.safetensors"
