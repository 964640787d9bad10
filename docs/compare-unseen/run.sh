#!/usr/bin/env bash
# Forecasting on a digits DiT this project never tuned on (same recipe as the reference model, seed 7,
# 1 500 training steps): plain FORA, static forecasting, fitted forecasting and diffusers' TaylorSeer.
set -euo pipefail
M=${1:-/tmp/unseen}; OUT=${2:-docs/compare-unseen}
harmonica compare --model "$M" --threads 2 --out "$OUT" --no-progress --num-samples 100 \
  --methods fora,forecast,taylorseer --sweep fora=2,3,4 --sweep forecast=2,3,4 --sweep taylorseer=2,3,4 \
  --router "fitted forecast N2=$3" --router "fitted forecast N3=$4"
