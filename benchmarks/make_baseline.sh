#!/usr/bin/env bash
# Writes results/baseline/: the reference runs that CI's `miarobust regress --baseline results/baseline`
# re-runs from their recorded configs and compares (shipped models, embedded data, n=200; AutoAttack n=50).
# Usage: bash benchmarks/make_baseline.sh   (from the repository root; rerun resumes)
set -euo pipefail
out=results/baseline
base=(--data embedded --checks auto --out "$out")
common=("${base[@]}" --n 200 --batch-size 100)
for eps in 2/255 8/255; do
  miarobust run --model vit_fmnist --attack pgd --eps "$eps" "${common[@]}"
  miarobust run --model mia_vit_fmnist --attack pgd --eps "$eps" "${common[@]}"
  miarobust run --model mia_vit_fmnist --gate-mode stochastic --eval-samples 4 --attack eot-pgd --eot 8 \
    --eps "$eps" "${common[@]}"
done
# AutoAttack (standard) at one eps on the first 50 images: it is the costly step of the gate (about a
# minute per model on 2 cores), so it uses fewer images than PGD.
for model in vit_fmnist mia_vit_fmnist; do
  miarobust run --model "$model" --attack autoattack --eps 8/255 --n 50 --batch-size 50 "${base[@]}"
done
