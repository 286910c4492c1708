"""Benchmark of `rhm-gen`: sentences/s against the Parquet I/O floor, and peak memory at 10^7.

For each grammar the full generator (distinct uniform sampling, decoding, streaming Parquet write)
is timed against the I/O floor: pyarrow writing the *same* token array, already in memory, with
the same schema and writer settings. The ratio generator/floor is the figure of merit (goal <= 2).
Peak RSS is read from a fresh `cgtools rhm-gen` process writing 10^7 sentences (goal <= 300 MiB).

Usage: python bench/rhm_gen.py [--n 1000000] [--big 10000000] [--repeat 3]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from cgtools.errors import ConfigError
from cgtools.formats.sequences import SequencesWriter, sequences_meta
from cgtools.grammar.dataset import GenerateConfig, write_dataset
from cgtools.grammar.rhm import draw_grammar
from timing import best_of  # bench/timing.py (the script's own folder is on sys.path)

CONFIGS = [(3, 2, 16, 4), (4, 2, 8, 4)]



def bench_config(shape, n, repeat, workdir: Path) -> dict:
    g = draw_grammar(*shape, seed=0)
    asked = n
    if n > g.n_sentences:
        try:
            write_dataset(g, GenerateConfig(num=n), str(workdir / "x.parquet"), True, {})
        except ConfigError as exc:
            refused = str(exc)
        n = g.n_sentences
    else:
        refused = None
    out = workdir / "gen.parquet"
    cfg = GenerateConfig(num=n, seed=1)
    t_gen = best_of(repeat, lambda: write_dataset(g, cfg, str(out), True, {}), warmup=False)
    tokens = pq.read_table(out)["tokens"].to_numpy(zero_copy_only=False)
    tokens = np.stack(tokens) if tokens.dtype == object else tokens
    meta = sequences_meta(g.to_json(), {})

    def floor():
        with open(workdir / "floor.parquet", "wb") as f:
            w = SequencesWriter(f, length=g.length, vocab=g.vocab, meta=meta)
            for start in range(0, n, cfg.batch_size):
                w.write(tokens[start:start + cfg.batch_size])
            w.close()

    t_floor = best_of(repeat, floor, warmup=False)
    return {"shape": shape, "asked": asked, "n": n, "refused": refused, "gen_s": t_gen,
            "floor_s": t_floor, "rate": n / t_gen, "ratio": t_gen / t_floor,
            "bytes": out.stat().st_size}


_CHILD = """
import sys
from cgtools.cli.main import app
try:
    app(sys.argv[1:], prog_name="cgtools", standalone_mode=False)
finally:
    hwm = [l for l in open("/proc/self/status") if l.startswith("VmHWM")][0].split()[1]
    sys.stderr.write(f"VmHWM {hwm}\\n")
"""


def peak_rss_mib(shape, n, workdir: Path) -> tuple[float, float]:
    """Peak RSS (MiB, the process's own VmHWM) and wall time of a fresh `rhm-gen` writing n sentences.

    Read inside the child: the fork of a large parent would otherwise inflate getrusage's maxrss.
    """
    L, s, v, m = shape
    args = ["--quiet", "rhm-gen", "-L", str(L), "-s", str(s), "-v", str(v), "-m", str(m),
            "-n", str(n), "-o", str(workdir / "big.parquet"), "--force"]
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", _CHILD, *args], check=True, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    kib = int(proc.stderr.split("VmHWM")[-1].split()[0])
    return kib / 1024, wall


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--big", type=int, default=10_000_000)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    print(f"rhm-gen benchmark: {os.cpu_count()} cores, best of {args.repeat}")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        print(f"{'grammar (L,s,v,m)':<20}{'sentences':>11}{'gen s':>9}{'floor s':>9}{'sent/s':>12}{'gen/floor':>11}")
        for shape in CONFIGS:
            r = bench_config(shape, args.n, args.repeat, work)
            print(f"{str(shape):<20}{r['n']:>11,}{r['gen_s']:>9.3f}{r['floor_s']:>9.3f}{r['rate']:>12,.0f}{r['ratio']:>11.2f}")
            if r["refused"]:
                print(f"  asked {r['asked']:,}: refused ({r['refused']}); timed the whole language instead")
        if args.big:
            rss, wall = peak_rss_mib(CONFIGS[1], args.big, work)
            print(f"peak RSS of `cgtools rhm-gen` at {args.big:,} sentences of {CONFIGS[1]}: {rss:.0f} MiB "
                  f"(wall {wall:.1f} s incl. start-up)")


if __name__ == "__main__":
    main()
