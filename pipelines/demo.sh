#!/usr/bin/env bash
# The demo pipeline on a small embedded default: the paper's acceptance grammar
# (L=3, s=2, v=8, m=2: 1024 sentences), a training set and a disjoint validation set,
# then accuracy and the theory's predictions. Usage: pipelines/demo.sh OUTDIR
set -euo pipefail
out=${1:-demo-out}
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
