"""`cgtools rhm-gen`: draw (or reuse) an RHM grammar and sample distinct sentences."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, List, Optional

import typer

from cgtools.cli.options import (BatchOpt, BranchingOpt, DepthOpt, ForceOpt, GrammarOpt, NClassesOpt, OutOpt, SeedOpt,
                                 SynonymsOpt, VocabOpt)
from cgtools.formats.files import open_input
from cgtools.formats.metadata import provenance
from cgtools.grammar.dataset import GenerateConfig, GrammarSpec, exclusion_keys, resolve_grammar, write_dataset


def rhm_gen(
    num: Annotated[int, typer.Option("--num", "-n", min=0, help="Number P of distinct sentences to write.", metavar="N")],
    depth: DepthOpt = None,
    branching: BranchingOpt = None,
    vocab: VocabOpt = None,
    synonyms: SynonymsOpt = None,
    n_classes: NClassesOpt = None,
    seed: SeedOpt = 0,
    grammar_seed: Annotated[Optional[int], typer.Option("--grammar-seed", min=0, help="Seed of the rules (default: --seed).", metavar="SEED")] = None,
    grammar: GrammarOpt = None,
    exclude: Annotated[Optional[List[Path]], typer.Option("--exclude", "-x", help="Sequences table whose sentences must not be drawn (repeatable).", metavar="FILE")] = None,
    latents: Annotated[bool, typer.Option("--latents", help="Add columns latent_1 … latent_L (latent_L = root).")] = False,
    perturb: Annotated[Optional[int], typer.Option("--perturb", min=1, help="Also write R_l x (column 'perturbed'): keep latents at levels >= LEVEL, redraw the productions below.", metavar="LEVEL")] = None,
    perturb_mode: Annotated[str, typer.Option("--perturb-mode", help="'synonym': level-LEVEL nodes switch to another production (paper); 'resample': redraw uniformly.")] = "synonym",
    grammar_out: Annotated[Optional[str], typer.Option("--grammar-out", help="Also write the grammar as safetensors.", metavar="FILE")] = None,
    out: OutOpt = "-",
    force: ForceOpt = False,
    batch_size: BatchOpt = 65536,
) -> None:
    """Draw P distinct sentences uniformly from a Random Hierarchy Model.

    The grammar is drawn from -L -s -v -m [--n-classes] and the seed, or reused with --grammar.
    Sentences are distinct and never equal to a sentence of an --exclude file, so splits are
    disjoint. The output is a sequences table (Parquet) carrying the grammar in its metadata.

    Examples:

      cgtools rhm-gen -L 3 -s 2 -v 8 -m 2 -n 512 --seed 0 -o train.parquet

      cgtools rhm-gen -g train.parquet -x train.parquet -n 128 --seed 1 -o val.parquet
    """
    if perturb_mode not in ("synonym", "resample"):
        raise typer.BadParameter("must be 'synonym' or 'resample'", param_hint="--perturb-mode")
    source = open_input(grammar) if grammar is not None else None
    spec = GrammarSpec(depth, branching, vocab, synonyms, n_classes)
    g = resolve_grammar(spec, seed if grammar_seed is None else grammar_seed, source)
    excluded = [open_input(p) for p in exclude or []]
    keys = exclusion_keys(g, excluded)
    cfg = GenerateConfig(num=num, seed=seed, latents=latents, perturb_level=perturb,
                         perturb_mode=perturb_mode, batch_size=batch_size)  # type: ignore[arg-type]
    prov = provenance("rhm-gen", seed, ([source] if source else []) + excluded)
    write_dataset(g, cfg, out, force, prov, keys, grammar_out)

