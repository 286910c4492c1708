#!/usr/bin/env bash
# The acceptance task of docs/training.md: grammar L=3, s=2, v=8, m=2 (1024 sentences); the
# default `cpu` preset trained on P=512 and on P=24 sentences (128 validation sentences held out),
# 512 samples of each measured against the grammar and the training set.
# About 7 minutes on 2 CPU cores. Usage: pipelines/acceptance.sh OUTDIR
# Writes OUTDIR/summary.json: {"P512": {...measure-accuracy JSON..., "train_seconds": S}, "P24": {...}}.
set -euo pipefail
out=${1:-acceptance-out}
mkdir -p "$out"
G=(-L 3 -s 2 -v 8 -m 2)

cgtools rhm-gen "${G[@]}" -n 512 --seed 0 -o "$out/train512.parquet" --force
cgtools rhm-gen -g "$out/train512.parquet" --exclude "$out/train512.parquet" -n 128 --seed 1 -o "$out/val.parquet" --force
cgtools rhm-gen -g "$out/train512.parquet" --exclude "$out/val.parquet" -n 24 --seed 2 -o "$out/train24.parquet" --force

for p in 512 24; do
  start=$(date +%s.%N)
  cgtools train "$out/train$p.parquet" --val "$out/val.parquet" -o "$out/run$p" --force
  end=$(date +%s.%N)
  cgtools sample "$out/run$p/model.safetensors" -n 512 --seed 1 -o "$out/samples$p.parquet" --force
  cgtools measure-accuracy "$out/samples$p.parquet" --train "$out/train$p.parquet" --json \
    | python3 -c "import json, sys; r = json.load(sys.stdin); r['train_seconds'] = round($end - $start, 1); print(json.dumps(r))" \
    > "$out/accuracy$p.json"
  echo "P=$p: $(cat "$out/accuracy$p.json")"
done
python3 -c "
import json, sys
d = sys.argv[1]
json.dump({f'P{p}': json.load(open(f'{d}/accuracy{p}.json')) for p in (512, 24)}, open(f'{d}/summary.json', 'w'), indent=1)
" "$out"
echo "wrote $out/summary.json"
