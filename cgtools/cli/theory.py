"""`cgtools theory`: the paper's closed-form predictions for an RHM."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from cgtools.analysis.theory import theory as predict
from cgtools.cli.options import JsonOpt
from cgtools.cli.output import emit_json, emit_table, fmt


def theory(
    depth: Annotated[int, typer.Option("--depth", "-L", min=1, help="Depth L.")],
    branching: Annotated[int, typer.Option("--branching", "-s", min=2, help="Branching s.")],
    vocab: Annotated[int, typer.Option("--vocab", "-v", min=1, help="Vocabulary size v.")],
    synonyms: Annotated[int, typer.Option("--synonyms", "-m", min=1, help="Synonyms m.")],
    n_classes: Annotated[Optional[int], typer.Option("--n-classes", min=1, help="Root symbols (default v).")] = None,
    json_out: JsonOpt = False,
) -> None:
    """Sizes, sample complexities P_l and correlation magnitudes predicted by the paper.

    P_l = v m^(l+1) / (1 - m/v^(s-1)) training sentences are needed to learn the rules of level l
    (Eq. 6); the predicted sample complexity is P* = P_L. C^(l) is the magnitude of token-latent
    tuple correlations with lowest common ancestor at level l (Eq. 3, 5, 19).

    Example:

      cgtools theory -L 3 -s 2 -v 8 -m 2
    """
    t = predict(depth, branching, vocab, synonyms, n_classes)
    if json_out:
        emit_json(t)
        return
    emit_table([
        ("length d", str(t["length"])),
        ("sentences", str(t["n_sentences"]) if t["log10_n_sentences"] < 30 else f"10^{t['log10_n_sentences']:.2f}"),
        ("f = m/v^(s-1)", fmt(t["f"])),
        ("P* = P_L", fmt(t["p_star"])),
    ], ("quantity", "value"))
    print()
    emit_table([(str(lv), fmt(p)) for lv, p in zip(t["levels"], t["sample_complexity"])], ("level l", "P_l"))
    if t["correlation_levels"]:
        print()
        emit_table([(str(lv), fmt(c), fmt(cf)) for lv, c, cf in zip(
            t["correlation_levels"], t["correlation"], t["correlation_finite_v"])],
            ("level l", "C^(l) (v,m large)", "C^(l) (Eq. 18, finite v)"))
