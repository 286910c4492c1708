"""`cgtools cluster`: correlation-based hierarchical clustering of synonyms (paper Sec. 4.3)."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from cgtools.cli.options import LimitOpt, BatchOpt, ForceOpt, GrammarOpt, JsonOpt, SeedOpt, TagOpt
from cgtools.cli.output import emit_json, emit_table, fmt


def cluster(
    level: Annotated[str, typer.Option("--level", "-l", help="Level(s) l to cluster (the level-(l-1) tuples into level-l classes): l, a list 1,2 or 'all' (= 1 … L-1; the root has no context).", metavar="SPEC")],
    data: Annotated[str, typer.Argument(help="Sentences: a sequences table ('-' = stdin).", metavar="DATA")] = "-",
    context: Annotated[str, typer.Option("--context", help="'token': one-hot of the visible token at --position (the paper's first token, Fig. 2 black); 'tuple': the visible s-tuple holding it, one categorical of v^s values (Fig. 2 red).")] = "token",
    method: Annotated[str, typer.Option("--method", help="'mean': mean context E[x | h = ν]; 'gd1': weights after one gradient step of the linear softmax model of App. B.")] = "mean",
    oracle: Annotated[bool, typer.Option("--oracle", help="Levels >= 2: tuples of the true latents (Fig. 7) instead of the clusters found at the level below.")] = False,
    node: Annotated[int, typer.Option("--node", min=0, help="The level-l node whose children form the clustered tuple (default 1: h_{s+1:2s}, paired with x_1 as in the paper).", metavar="J")] = 1,
    position: Annotated[int, typer.Option("--position", min=0, help="Visible position of the context token, outside the node's subtree (default 0: x_1).", metavar="I")] = 0,
    clusters: Annotated[str, typer.Option("--clusters", "-k", help="k of k-means: 'classes' (the number of true classes among the observed values), 'v', or a number.", metavar="K")] = "classes",
    weighted: Annotated[bool, typer.Option("--weighted", help="Weight each tuple value by its number of occurrences in k-means (default: every value counts once).")] = False,
    n_init: Annotated[int, typer.Option("--n-init", min=1, help="k-means restarts (k-means++ starts; the lowest inertia wins).")] = 10,
    gd_init: Annotated[str, typer.Option("--gd-init", help="gd1 only: start at 'marginal' (log of the context marginal, App. B) or 'zero'.")] = "marginal",
    limit: LimitOpt = None,
    grammar: GrammarOpt = None,
    seed: SeedOpt = 0,
    json_out: JsonOpt = False,
    out: Annotated[Optional[str], typer.Option("--out", "-o", help="Write one row per level to this Parquet results table ('-' = stdout).", metavar="FILE")] = None,
    tag: TagOpt = None,
    force: ForceOpt = False,
    batch_size: BatchOpt = 65536,
) -> None:
    """Cluster synonyms by their correlations with the context ("hierarchical word2vec").

    For level l, every observed value ν of the s-tuple of level-(l-1) symbols below level-l node
    --node (default 1) gets its mean context vector E[x | h = ν], x being the one-hot visible
    token at --position (default 0, x_1: the tuple and the token meet at level l+1, so about
    P_{l+1} = v m^(l+2)/(1 - m/v^(s-1)) sentences are needed). k-means (k-means++, --n-init
    restarts, seeded by --seed) groups the vectors; the adjusted Rand index (ARI) compares the
    groups with the true synonym classes (the level-l symbol that produces each value).

    Levels >= 2 are hierarchical: the tuples are made of the cluster labels found at the levels
    below (so errors propagate); --oracle uses the true latents instead. Prints one row per level
    (ari, n sentences, n_used, n_values distinct tuple values, classes, k); --json prints one
    JSON object per level; -o writes a results table (kind 'cluster') whose --tag columns let
    the tables of a sweep over P concatenate.

    Examples:

      cgtools cluster data.parquet --level 1 --json

      cgtools cluster data.parquet --level all --context tuple

      for P in 1000 3000 10000; do cgtools cluster data.parquet --level 1 --limit $P --tag P=$P -o c$P.parquet; done
    """
    from cgtools.analysis.clustering import (RESULT_COLUMNS, RESULTS_KIND, ClusterConfig, cluster_levels,
                                             parse_levels, results_columns)
    from cgtools.errors import ConfigError
    from cgtools.formats.files import check_output, open_input
    from cgtools.formats.metadata import provenance
    from cgtools.formats.results import parse_tags, results_table, write_results
    from cgtools.formats.sequences import SequencesTable
    from cgtools.grammar.source import resolve_grammar

    if out == "-" and json_out:
        raise typer.BadParameter("cannot write both the table and JSON to stdout", param_hint="--out")
    tags = parse_tags(tag)
    taken = sorted(set(tags) & set(RESULT_COLUMNS))
    if taken:
        raise ConfigError(f"tag {taken[0]!r} has the name of a cluster result column; choose another")
    if out is not None:
        check_output(out, force)
    source = open_input(data)
    table = SequencesTable(source)
    gsource = open_input(grammar) if grammar is not None else None
    g = resolve_grammar(gsource, table)
    levels = parse_levels(level, g.depth)
    if clusters == "classes":
        k = None
    elif clusters == "v":
        k = g.vocab
    else:
        try:
            k = int(clusters)
        except ValueError:
            raise ConfigError(f"--clusters must be 'classes', 'v' or a number, got {clusters!r}") from None
    config = ClusterConfig(context=context, method=method, oracle=oracle, node=node, position=position,
                           clusters=k, weighted=weighted, n_init=n_init, gd_init=gd_init, seed=seed)
    total = table.rows(limit)
    results = cluster_levels(lambda: table.iter_column(length=g.length, batch_size=batch_size, limit=limit),
                             g, levels, config, where=source.display(), total=total)
    if out is not None:
        prov = provenance("cluster", seed, [source] + ([gsource] if gsource else []))
        meta = {"n_init": n_init, "gd_init": gd_init if method == "gd1" else None}
        write_results(results_table(results_columns(results), kind=RESULTS_KIND, tags=tags, provenance=prov,
                                    grammar=g.to_json(), **meta), out, force)
    if json_out:
        for r in results:
            emit_json(r.to_json())
        return
    if out is not None:
        return  # the table holds the results; stdout stays free
    header = ("level", "ari", "n", "n_used", "n_values", "classes", "k", "context", "method", "oracle")
    rows = [(str(r.level), fmt(r.ari), str(r.n), str(r.n_used), str(r.n_values), str(r.classes),
             str(r.clusters), r.context, r.method, str(r.oracle).lower()) for r in results]
    emit_table(rows, header)
