"""Benchmark: models trained per hour by `cgtools sweep` against one `cgtools train` process per model.

The sweep of the issue: eight models of the `cpu` preset (width 256) on RHM data L=3, s=2, v=8,
m=2 — training sets P = 64, 128, 256, 512 sentences × training seeds 0, 1, one set of 128 disjoint
validation sentences — each trained for --steps steps with the preset's validation at the end
(loss, bound and the 128-sample check). Measured in the same run, in interleaved rounds, as wall
time of everything a pipeline pays (interpreter start-up, data loading, training, validation,
checkpoints):

* sequential: one `cgtools train` process after another (torch's default threads: 2);
* 2 parallel: `cgtools train --threads 1`, two processes at a time (what `make -j2` runs);
* sweep: one `cgtools sweep` process over a manifest of the eight runs (its default: two stacks
  of four side by side, one thread each);
* sweep -j1: the same with `--jobs 1` (one stack of eight on both threads).

    .venv/bin/python bench/sweep.py                      # 300 steps, 2 rounds (about 6 min)
    .venv/bin/python bench/sweep.py --steps 1000 --rounds 3

Goal (issue): the sweep trains at least 2x the models per hour of the best per-process way.
Ratios are per round (the ways of one round share its load); best and median over rounds.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SIZES = (64, 128, 256, 512)
SEEDS = (0, 1)
GRAMMAR = ["-L", "3", "-s", "2", "-v", "8", "-m", "2"]


def cgtools(*args: str) -> list[str]:
    return [sys.executable, "-m", "cgtools", "--quiet", *args]


def make_data(root: Path) -> list[dict]:
    """Training tables, the validation table and the manifest entries (run dirs under root/<way>)."""
    run = lambda *a: subprocess.run(cgtools(*a), check=True)  # noqa: E731
    run("rhm-gen", *GRAMMAR, "-n", "512", "--seed", "0", "-o", str(root / "P512.parquet"))
    run("rhm-gen", "-g", str(root / "P512.parquet"), "--exclude", str(root / "P512.parquet"), "-n", "128",
        "--seed", "1", "-o", str(root / "val.parquet"))
    for p in SIZES[:-1]:
        run("rhm-gen", "-g", str(root / "P512.parquet"), "--exclude", str(root / "val.parquet"), "-n", str(p),
            "--seed", str(2 + p), "-o", str(root / f"P{p}.parquet"))
    return [{"data": str(root / f"P{p}.parquet"), "val": str(root / "val.parquet"), "name": f"P{p}_s{s}",
             "seed": s} for p in SIZES for s in SEEDS]


def train_cmd(run: dict, out: Path, steps: int, threads: int | None) -> list[str]:
    cmd = cgtools("train", run["data"], "--val", run["val"], "-o", str(out / run["name"]),
                  "--steps", str(steps), "--seed", str(run["seed"]), "--force")
    return cmd + (["--threads", str(threads)] if threads else [])


def sweep_cmd(runs: list[dict], out: Path, steps: int, jobs: int | None, tag: str) -> list[str]:
    manifest = out / f"runs_{tag}.json"
    manifest.write_text(json.dumps([{"data": r["data"], "val": r["val"], "out": str(out / r["name"]),
                                     "seed": r["seed"]} for r in runs]))
    cmd = cgtools("sweep", str(manifest), "--steps", str(steps), "--force")
    return cmd + (["--jobs", str(jobs)] if jobs else [])


def run_all(cmds: list[list[str]], jobs: int) -> float:
    """Wall seconds to run `cmds` with at most `jobs` at a time (a new one starts when one ends)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    t0 = time.perf_counter()
    pending, running = list(cmds), []
    while pending or running:
        while pending and len(running) < jobs:
            running.append(subprocess.Popen(pending.pop(0), env=env))
        for p in list(running):
            if p.poll() is not None:
                if p.returncode:
                    raise SystemExit(f"failed ({p.returncode}): {' '.join(p.args)}")
                running.remove(p)
        time.sleep(0.02)
    return time.perf_counter() - t0


def loadavg() -> str:
    try:
        return f"{os.getloadavg()[0]:.2f}"
    except OSError:
        return "?"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--ways", default="sequential,parallel,sweep,sweep-j1",
                   help="comma-separated subset of sequential, parallel, sweep, sweep-j1")
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench_sweep_") as tmp:
        root = Path(tmp)
        runs = make_data(root)
        n = len(runs)
        ways = {
            "sequential": lambda out: run_all([train_cmd(r, out, args.steps, None) for r in runs], 1),
            "parallel": lambda out: run_all([train_cmd(r, out, args.steps, 1) for r in runs], 2),
            "sweep": lambda out: run_all([sweep_cmd(runs, out, args.steps, None, "all")], 1),
            "sweep-j1": lambda out: run_all([sweep_cmd(runs, out, args.steps, 1, "j1")], 1),
        }
        chosen = [w for w in args.ways.split(",") if w]
        times: dict[str, list[float]] = {w: [] for w in chosen}
        print(f"{n} models x {args.steps} steps, cpu preset (width 256, batch 64, T = 100), "
              f"L=3 s=2 v=8 m=2, 128 validation sentences, 128-sample check at the end; "
              f"{os.cpu_count()} cores", flush=True)
        for r in range(args.rounds):
            for way in chosen:  # interleaved: every round runs every way once
                out = root / f"r{r}_{way}"
                out.mkdir()
                load = loadavg()
                times[way].append(ways[way](out))
                print(f"round {r + 1}: {way:<10} {times[way][-1]:7.1f} s  (load {load})", flush=True)
        per_proc = [w for w in ("sequential", "parallel") if w in chosen]
        print()
        print("| way | wall s (best / median) | models/hour (best / median) | vs best per-process way, per round (best / median) |")
        print("|---|---|---|---|")
        for way in chosen:
            ts = times[way]
            ratios = [min(times[b][i] for b in per_proc) / ts[i] for i in range(len(ts))] if per_proc else []
            ratio = f"{max(ratios):.2f}x / {statistics.median(ratios):.2f}x" if ratios else "-"
            print(f"| {way} | {min(ts):.1f} / {statistics.median(ts):.1f} | {n * 3600 / min(ts):.0f} / "
                  f"{n * 3600 / statistics.median(ts):.0f} | {ratio} |")


if __name__ == "__main__":
    main()
