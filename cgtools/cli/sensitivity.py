"""`cgtools sensitivity`: how much each U-Net block changes under synonym exchanges at each level
(App. D.1, eq. 26, Fig. 6)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, List, Optional

import typer

from cgtools.cli.options import (BatchOpt, DeviceOpt, ForceOpt, GrammarOpt, JsonOpt, LimitOpt, NoiseOpt, SeedOpt,
                                 TagOpt, ThreadsOpt, check_device, single_noise, use_threads)
from cgtools.cli.output import emit_json, emit_table, fmt

Opt = typer.Option


def sensitivity(
    ckpt: Annotated[Path, typer.Argument(help="Checkpoint written by `cgtools train` (RUN_DIR/model.safetensors).", metavar="CKPT")],
    data: Annotated[List[Path], typer.Argument(help="Sequences tables with a 'perturbed' column (`rhm-gen --perturb LEVEL`), one per level; each table's level is read from its metadata.", metavar="DATA...")],
    noise: NoiseOpt = "0",
    grammar: GrammarOpt = None,
    limit: LimitOpt = None,
    batch_size: BatchOpt = 256,
    seed: SeedOpt = 0,
    raw_weights: Annotated[bool, Opt("--raw-weights", help="Use the raw weights even if the checkpoint holds a weight average.")] = False,
    device: DeviceOpt = "cpu",
    threads: ThreadsOpt = None,
    json_out: JsonOpt = False,
    out: Annotated[Optional[str], Opt("--out", "-o", help="Write one row per (block, level) to this Parquet results table ('-' = stdout).", metavar="TABLE")] = None,
    tag: TagOpt = None,
    force: ForceOpt = False,
) -> None:
    """Relative sensitivity S_{k,l} of every block k of a trained network to synonym exchanges
    at level l (App. D.1, eq. 26):

      S_{k,l} = E_x ||a_k(x) - a_k(R_l x)||² / E_{x,y} ||a_k(x) - a_k(y)||²

    a_k: the block's pre-activations (U-Net: enc1..encL, dec1..decL, before the GeLU), the norm
    over all its positions and channels; R_l x: the 'perturbed' column of a DATA table (latents at
    levels >= l kept, productions from level l down redrawn); y: an independent sentence (the
    denominator is the mean over all pairs of distinct sentences of DATA, i.e. twice the total
    variance of a_k). S = 0: block k is invariant to R_l; S ≈ 1: R_l x is as different as another
    sentence. The paper does not say at which noise level it feeds the network: by default clean
    sentences at the lowest level of the reverse process (uniform: t = 1, network time 1/T);
    --noise E corrupts x, R_l x and a partner sentence y with one shared noise draw and uses the
    time whose corruption is closest to E.

    DATA must come from the checkpoint's grammar unless --grammar is given. Prints a block ×
    level table; --json prints one object ("blocks", "levels", "sensitivity"[block][level], "n"
    per level, "numerator", "denominator", "noise", "time"); -o writes a results table (kind
    "sensitivity"); --tag P=512 labels it so that the tables of a sweep over P concatenate for
    `plot` (Fig. 6).

    Examples:

      for l in 1 2 3; do cgtools rhm-gen --grammar train.parquet -n 2048 --seed 9 --perturb $l -o pert_$l.parquet; done

      cgtools sensitivity run/model.safetensors pert_1.parquet pert_2.parquet pert_3.parquet

      cgtools sensitivity run/model.safetensors pert_*.parquet --tag P=4096 -o sens_P4096.parquet
    """
    from cgtools.analysis.sensitivity import (perturbation_level, results_table_write,
                                              sensitivity as measure, table_pairs)
    from cgtools.errors import InputError
    from cgtools.formats.files import check_output, open_input
    from cgtools.formats.metadata import provenance
    from cgtools.formats.results import parse_tags
    from cgtools.formats.sequences import SequencesTable
    from cgtools.grammar.source import load_grammar, resolve_grammar
    from cgtools.inference.forward_backward import check_model
    from cgtools.training.trained import load_model

    noise = single_noise(noise)
    check_device(device)
    use_threads(threads)
    if out == "-" and json_out:
        raise typer.BadParameter("cannot write both the table and JSON to stdout", param_hint="--out")
    tags = parse_tags(tag)
    if out is not None:
        check_output(out, force)
    csource = open_input(ckpt)
    model = load_model(str(ckpt), device=device, use_ema=not raw_weights)
    gsource = open_input(grammar) if grammar is not None else None
    g = load_grammar(gsource) if gsource is not None else None
    if g is not None:
        check_model(model, g, where=csource.display(), same_grammar=False)
    sources, tables, files = [csource] + ([gsource] if gsource else []), {}, []
    for path in data:
        source = open_input(path)
        table = SequencesTable(source)
        if gsource is None:
            g_table = resolve_grammar(None, table)
            check_model(model, g_table, where=csource.display(), data=table.display())
            g = g or g_table
        level = perturbation_level(table, g.depth)
        if level in tables:
            raise InputError(f"{table.display()} and {tables[level].display()} both hold level {level}; "
                             f"give one table per level")
        tables[level] = table
        sources.append(source)
        files.append({"level": level, "file": table.display(),
                      "mode": (table.meta.get("perturbation") or {}).get("mode")})
    pairs = {lv: table_pairs(t, g.length, num=limit) for lv, t in tables.items()}
    total = sum(t.rows(limit) for t in tables.values())
    result = measure(model, pairs, noise=noise, batch_size=batch_size, seed=seed, device=device,
                     total=total, where={lv: t.display() for lv, t in tables.items()})
    if out is not None:
        results_table_write(result, out, force, grammar=g.to_json(), tags=tags,
                            provenance=provenance("sensitivity", seed, sources),
                            checkpoint=csource.display(), arch=model.arch,
                            data=sorted(files, key=lambda f: f["level"]))
    if json_out:
        emit_json(result.to_json())
        return
    if out is not None:
        return  # the table holds the results; stdout stays free
    header = ("block",) + tuple(f"S_{lv}" for lv in result.levels)
    rows = [(name,) + tuple(fmt(v) for v in result.sensitivity[k]) for k, name in enumerate(result.blocks)]
    emit_table(rows, header)
