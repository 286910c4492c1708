"""Summary of the text coherence pipeline: per checkpoint, the coherence length of the samples'
correlations, their perplexity at a few context lengths, and sample texts.

Coherence length (our definition; the paper reads it off Fig. 4b by eye): the largest distance t
such that the pooled correlation stays above twice its noise floor 1/(v sqrt(N)) at every distance
up to t (0 when it is below at t = 1); reported as ">= t_max" when it never falls below.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

FLOOR_FACTOR = 2.0


def _rows(path: str, kind: str) -> tuple[dict, list[dict]]:
    from cgtools.formats.files import open_input
    from cgtools.formats.results import read_results

    res = read_results(open_input(path), kind=kind)
    return res.meta, res.rows()


def coherence_length(rows: list[dict]) -> tuple[int, bool]:
    """(t, capped): the coherence length of one correlation curve (module docstring)."""
    rows = sorted(rows, key=lambda r: r["distance"])
    t = 0
    for r in rows:
        if r["correlation"] is None or r["noise_floor"] is None or r["correlation"] <= FLOOR_FACTOR * r["noise_floor"]:
            return t, False
        t = r["distance"]
    return t, True


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--corr", nargs="+", required=True)
    p.add_argument("--ppl", nargs="+", required=True)
    p.add_argument("--texts", nargs="+", required=True)
    p.add_argument("--metrics", required=True)
    p.add_argument("-o", "--out", required=True)
    args = p.parse_args(argv)

    import pyarrow.parquet as pq

    with open(args.metrics, "rb") as f:  # one open file: the run may be rewriting it
        metrics = pq.read_table(f).to_pylist()
    per_step = next((m["tokens"] / m["step"] for m in metrics if m.get("tokens") and m["step"]), None)
    stages: dict[str, dict] = {}
    for path in args.corr:
        meta, rows = _rows(path, "correlation")
        step = str(meta["tags"]["step"])
        xi, capped = coherence_length(rows)
        stages.setdefault(step, {})["coherence"] = (xi, capped)
        stages[step]["floor"] = rows[0]["noise_floor"]
    for path in args.ppl:
        meta, rows = _rows(path, "perplexity")
        tags = meta["tags"]
        step = str(tags.get("step", tags.get("reference")))
        stages.setdefault(step, {})["ppl"] = {r["context_length"]: r["perplexity"] for r in rows}
    for path in args.texts:
        step = Path(path).stem.removeprefix("step")
        stages.setdefault(step, {})["text"] = Path(path).read_text()

    def order(step: str) -> tuple:
        return (1, 0) if not step.isdigit() else (0, int(step))

    lengths = sorted({t for s in stages.values() for t in s.get("ppl", {})})
    shown = [t for t in lengths if t & (t - 1) == 0][:8]
    head = f"{'step':>6} {'tokens':>10} {'val loss':>9} {'coherence':>10} " + " ".join(f"{'ppl@' + str(t):>9}" for t in shown)
    lines = ["Text coherence: the samples of each checkpoint (and the data's own validation chunks)",
             f"coherence length: the distance up to which the pooled correlation stays above "
             f"{FLOOR_FACTOR:g}x its noise floor; perplexity under the judge LM at context length T", "", head]
    out = {"stages": {}}
    for step in sorted(stages, key=order):
        s = stages[step]
        # the validation loss where a validation fell on the checkpoint's step ("-" otherwise:
        # the nearest validation would describe other weights); tokens = step x batch x length
        row = next((m for m in metrics if str(m["step"]) == step), None)
        loss = row.get("val_loss") if row else None
        tokens = int(step) * per_step if step.isdigit() and per_step else None
        xi, capped = s.get("coherence", (None, False))
        xi_text = "-" if xi is None else (f">={xi}" if capped else str(xi))
        ppl = s.get("ppl", {})
        lines.append(f"{step:>6} {'-' if tokens is None else f'{tokens:.3g}':>10} "
                     f"{'-' if loss is None else f'{loss:.3f}':>9} {xi_text:>10} "
                     + " ".join(f"{ppl[t]:>9.1f}" if t in ppl and math.isfinite(ppl[t]) else f"{'-':>9}" for t in shown))
        out["stages"][step] = {"tokens": tokens, "val_loss": loss, "coherence_length": xi,
                               "coherence_capped": capped, "perplexity": {str(t): v for t, v in ppl.items()}}
    lines.append("")
    for step in sorted(stages, key=order):
        if "text" in stages[step]:
            lines += [f"== samples at step {step} ==" if step.isdigit() else f"== {step} (validation chunks) ==",
                      stages[step]["text"].rstrip(), ""]
    text = "\n".join(lines) + "\n"
    from cgtools.formats.files import write_text

    write_text(args.out, text)
    write_text(str(Path(args.out).with_suffix(".json")), json.dumps(out, indent=2) + "\n")
    sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
