"""`cgtools theory`: the paper's closed-form predictions for an RHM."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from cgtools.analysis.theory import theory as predict
from cgtools.cli.options import BranchingOpt, DepthOpt, JsonOpt, NClassesOpt, ProcessOpt, SynonymsOpt, VocabOpt
from cgtools.cli.output import emit_json, emit_table, fmt


def theory(
    depth: DepthOpt,
    branching: BranchingOpt,
    vocab: VocabOpt,
    synonyms: SynonymsOpt,
    n_classes: NClassesOpt = None,
    noise_grid: Annotated[Optional[str], typer.Option("--noise-grid", help="Also give the mean-field forward-backward prediction (changed fraction per level) on these noise levels: E, E1,E2,... or START:STOP:COUNT.", metavar="SPEC")] = None,
    process: ProcessOpt = "uniform",
    json_out: JsonOpt = False,
) -> None:
    """Sizes, sample complexities P_l and correlation magnitudes predicted by the paper.

    P_l = v m^(l+1) / (1 - m/v^(s-1)) training sentences are needed to learn the rules of level l
    (Eq. 6); the predicted sample complexity is P* = P_L. C^(l) is the magnitude of token-latent
    tuple correlations with lowest common ancestor at level l (Eq. 3, 5, 19).

    With --noise-grid, also the mean-field theory of the forward-backward phase transition (JSON
    key "mean_field"): for each noise level E the predicted fraction of changed nodes at levels
    0 … L, the root's kept probability, the L → ∞ critical noise and this depth's midpoint.

    Examples:

      cgtools theory -L 3 -s 2 -v 8 -m 2

      cgtools theory -L 4 -s 2 -v 32 -m 4 --noise-grid 0:1:11 --json
    """
    grid = noise_process = None
    if noise_grid is not None:
        from cgtools.analysis.mean_field import noise_grid as parse_grid
        from cgtools.diffusion.registry import make_process, process_names
        from cgtools.training.presets import DEFAULT_PRESET, process_config

        if process not in process_names():
            raise typer.BadParameter(f"must be one of {', '.join(process_names())}", param_hint="--process")
        grid = parse_grid(noise_grid)
        noise_process = make_process(process_config(DEFAULT_PRESET, process), vocab)
    t = predict(depth, branching, vocab, synonyms, n_classes, grid, noise_process)
    if json_out:
        emit_json(t)
        return
    emit_table([
        ("length d", str(t["length"])),
        ("sentences", str(t["n_sentences"]) if t["log10_n_sentences"] < 30 else f"10^{fmt(t['log10_n_sentences'])}"),
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
    if grid is not None:
        mf = t["mean_field"]
        print()
        emit_table([("E_c (L -> inf)", fmt(mf["critical_noise"])),
                    ("root midpoint (this L)", fmt(mf["transition_noise"]))], ("mean field", "noise"))
        print()
        emit_table([(fmt(e, 3),) + tuple(fmt(c) for c in row) for e, row in zip(mf["noise"], mf["changed"])],
                   ("noise",) + tuple(f"changed_{lv}" for lv in range(depth + 1)))
