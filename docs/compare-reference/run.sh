#!/usr/bin/env bash
# The committed compare run on the reference model (docs/compare-reference).
set -euo pipefail
R=python/harmonica/reference/assets/routers
harmonica compare --threads 2 --out docs/compare-reference --no-progress \
  --sweep forecast=2,3,4,5 --sweep step=2,3,4,5 --sweep steps=0.35,0.4 \
  --router "HarmoniCa published=$R/harmonica-T20.safetensors" \
  --router "HarmoniCa hard-λ ST=$R/harmonica-plus-T20.safetensors" \
  --router "HarmoniCa hard-λ ST age2=$R/harmonica-plus-age2-T20.safetensors" \
  --router "HarmoniCa steps=$R/harmonica-steps-T20.safetensors" \
  --router "SDT only=$R/sdt-T20.safetensors" \
  --router "L2C=$R/l2c-T20.safetensors" \
  --router "HarmoniCa forecast+exchanges 35%=$R/harmonica-forecast-T20-35.safetensors" \
  --router "HarmoniCa forecast+exchanges 40%=$R/harmonica-forecast-T20-40.safetensors" \
  --router "HarmoniCa forecast+exchanges 50%=$R/harmonica-forecast-T20-50.safetensors" \
  --router "HarmoniCa forecast+exchanges 45%=$R/harmonica-forecast-T20-45.safetensors" \
  --router "HarmoniCa forecast+exchanges 55%=$R/harmonica-forecast-T20-55.safetensors" \
  --router "search 35%=$R/search-a2-b24-T20-35.safetensors" \
  --router "search 40%=$R/search-a2-b24-T20-40.safetensors" \
  --router "search 50%=$R/search-a2-b24-T20-50.safetensors" \
  --router "fitted forecast even 35% w1=$R/even1-fit-T20-35.safetensors" \
  --router "fitted forecast even 35% w3=$R/even3-fit-T20-35.safetensors" \
  --router "fitted forecast even 40% w1=$R/even1-fit-T20-40.safetensors" \
  --router "fitted forecast even 40% w3=$R/even3-fit-T20-40.safetensors" \
  --router "fitted forecast even 50% w1=$R/even1-fit-T20-50.safetensors" \
  --router "fitted forecast even 50% w3=$R/even3-fit-T20-50.safetensors" \
  --router "fitted forecast N2=$R/fora2-fit-T20.safetensors" \
  --router "fitted forecast N3=$R/fora3-fit-T20.safetensors" \
  --router "fitted forecast N4=$R/fora4-fit-T20.safetensors" \
  --router "searched forecast 45%=$R/forecast-T20-45.safetensors" \
  --router "searched forecast 55%=$R/forecast-T20-55.safetensors" \
  --router "searched forecast 65%=$R/forecast-T20-65.safetensors" \
  --router "searched forecast 75%=$R/forecast-T20-75.safetensors" \
  --router "searched forecast 80%=$R/forecast-T20-80.safetensors"
