#!/usr/bin/env bash
# The demo pipeline on a small embedded default: the paper's acceptance grammar
# (L=3, s=2, v=8, m=2: 1024 sentences), a training set and a disjoint validation set, the
# theory's predictions, a short diffusion training run, its samples measured level by level
# against the exact (belief-propagation) generator, and a forward-backward comparison.
# About 2 minutes on 2 CPU cores. Usage: pipelines/demo.sh OUTDIR [STEPS]
set -euo pipefail
out=${1:-demo-out}
steps=${2:-3000}
mkdir -p "$out"
G=(-L 3 -s 2 -v 8 -m 2)

echo "== grammar L=3 s=2 v=8 m=2: the paper's predictions (cgtools theory)"
cgtools theory "${G[@]}"

echo
echo "== 512 training and 128 validation sentences, disjoint (cgtools rhm-gen)"
cgtools rhm-gen "${G[@]}" -n 512 --seed 0 --latents --grammar-out "$out/grammar.safetensors" -o "$out/train.parquet" --force
cgtools rhm-gen --grammar "$out/train.parquet" --exclude "$out/train.parquet" -n 128 --seed 1 -o "$out/val.parquet" --force
echo "wrote $out/train.parquet, $out/val.parquet, $out/grammar.safetensors"

echo
echo "== validation set measured against the training set (cgtools measure-accuracy)"
cgtools measure-accuracy "$out/val.parquet" --train "$out/train.parquet"

echo
echo "== synonym-exchanged training sentences R_2 x stay grammatical (piped through stdin)"
cgtools rhm-gen --grammar "$out/grammar.safetensors" -n 256 --seed 2 --perturb 2 -o - \
  | cgtools measure-accuracy - --column perturbed --json

echo
echo "== a uniform-D3PM U-Net (width 256) trained for $steps steps on the 512 sentences (cgtools train)"
cgtools train "$out/train.parquet" --val "$out/val.parquet" -o "$out/run" --steps "$steps" \
  --eval-every 1000 --sample-check 0 --force
echo "wrote $out/run/model.safetensors, $out/run/metrics.parquet, $out/run/checkpoints/"

echo
echo "== 512 samples of the trained model: accuracy per level, copies, new grammatical sentences"
cgtools sample "$out/run/model.safetensors" -n 512 --seed 1 -o "$out/samples.parquet" --force
cgtools measure-accuracy "$out/samples.parquet" --train "$out/train.parquet"

echo
echo "== the same from the exact denoiser (belief propagation through the same sampler)"
cgtools sample --denoiser bp --grammar "$out/grammar.safetensors" -n 512 --seed 1 -o - \
  | cgtools measure-accuracy - --train "$out/train.parquet"

echo
echo "== forward-backward on the validation sentences: exact BP, then the trained model"
cgtools forward-backward "$out/val.parquet" --noise 0:0.8:5
cgtools forward-backward "$out/val.parquet" --noise 0:0.8:5 --denoiser "$out/run/model.safetensors"
