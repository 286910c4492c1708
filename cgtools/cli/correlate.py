"""`cgtools correlate`: token-token correlation magnitude versus distance, with its noise floor."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, List, Optional

import typer

from cgtools.cli.options import BatchOpt, ForceOpt, GrammarOpt, JsonOpt, TagOpt
from cgtools.cli.output import emit_json, emit_table, fmt
from cgtools.formats.files import open_input

RESULTS_KIND = "correlation"


def correlate(
    seqs: Annotated[Optional[str], typer.Argument(help="Sequences table ('-' = stdin, the default; not read with --exact --grammar FILE).", metavar="SEQS", show_default=False)] = None,
    pooled: Annotated[bool, typer.Option("--pooled", help="Pool every pair (i, i+t) of every sequence into one covariance per distance t (text; sequences may differ in length between row batches).")] = False,
    by_tree_distance: Annotated[bool, typer.Option("--by-tree-distance", help="RHM data: group the pairs by the level of their lowest common ancestor (1 = siblings); the distance column holds that level.")] = False,
    exact: Annotated[bool, typer.Option("--exact", help="The infinite-data value for the grammar (from --grammar or SEQS), computed from the tree's Markov structure without sampling.")] = False,
    grammar: GrammarOpt = None,
    vocab: Annotated[Optional[int], typer.Option("--vocab", min=1, help="Vocabulary size v (default: the grammar's v, else the table's metadata 'vocab' (cgtools tokenize writes it), else the largest token id + 1).")] = None,
    max_distance: Annotated[Optional[int], typer.Option("--max-distance", min=1, help="Largest distance t (largest LCA level with --by-tree-distance) [default: all].", metavar="T")] = None,
    column: Annotated[str, typer.Option("--column", help="List column to measure.")] = "tokens",
    exclude: Annotated[Optional[List[Path]], typer.Option("--exclude", "-x", help="Sequences table whose sequences are left out of the measurement (repeatable): with a model's training set, only its novel samples are measured.", metavar="FILE")] = None,
    batch_size: BatchOpt = 65536,
    json_out: JsonOpt = False,
    out: Annotated[Optional[str], typer.Option("--out", "-o", help="Write one row per distance to this results table ('-' = stdout).", metavar="FILE")] = None,
    tag: TagOpt = None,
    force: ForceOpt = False,
) -> None:
    """Token-token correlation magnitude C(t) versus distance t (paper Fig. 1c, 4b).

    |C_ij| = ||C_ij||_F / v, the Frobenius norm of the empirical covariance of one-hot(x_i) and
    one-hot(x_j), C_ij[a,b] = P(x_i=a, x_j=b) - P(x_i=a) P(x_j=b), divided by the vocabulary size
    v (the scale on which the noise floor is 1/(v sqrt N); the column `frobenius` has the norm
    itself). Default (fixed-length sequences): C(t) = mean over positions i of |C_{i,i+t}| from
    the N sequences. --pooled: one covariance per t from every pair at distance t, N = their
    number. --by-tree-distance (RHM): mean of |C_ij| over the pairs whose lowest common ancestor
    is at level l = 1..L. --exclude FILE leaves out the sequences that occur in FILE (e.g. a
    model's training set: the correlations of its novel samples only). Every row has the noise
    floor 1/(v sqrt N) (N: the sequences measured); with a grammar, positional and
    tree rows also carry `theory`, the App. A magnitude (1 - m/v^(s-1))^(1/2) (v^3 m^(2l-1))^(-1/2)
    of a pair with LCA level l, averaged over the row's pairs (the power law of Cagnetta & Wyart
    2024). Counts only distinct pairs, so a 50,257-token vocabulary needs no v x v matrix.

    With -o, stdout stays empty unless --json.

    Examples:

      cgtools correlate samples.parquet

      cgtools correlate text.parquet --pooled --vocab 50257 --max-distance 256 -o corr.parquet --tag step=1000

      cgtools correlate --exact --grammar train.parquet --by-tree-distance --json
    """
    from cgtools.analysis import correlation as corr
    from cgtools.formats.metadata import provenance
    from cgtools.formats.results import parse_tags, results_table, write_results
    from cgtools.formats.sequences import TOKENS, SequencesTable
    from cgtools.grammar.source import resolve_grammar

    if pooled and by_tree_distance:
        raise typer.BadParameter("--pooled and --by-tree-distance exclude each other", param_hint="--pooled")
    if by_tree_distance and column != TOKENS:
        raise typer.BadParameter("--by-tree-distance groups visible tokens; measure the 'tokens' column",
                                 param_hint="--column")
    if exact and vocab is not None:
        raise typer.BadParameter("the exact law uses the grammar's vocabulary", param_hint="--vocab")
    if out == "-" and json_out:
        raise typer.BadParameter("cannot write both the table and JSON to stdout", param_hint="--out")
    if exclude and (exact or pooled):
        raise typer.BadParameter("--exclude drops whole sequences of a fixed length: not with --exact or --pooled",
                                 param_hint="--exclude")
    tags = parse_tags(tag)
    if out is not None:
        from cgtools.formats.files import check_output

        check_output(out, force)
    mode = "pooled" if pooled else "tree" if by_tree_distance else "positional"
    gsource = open_input(grammar) if grammar is not None else None
    sources = [gsource] if gsource is not None else []
    if exact:
        table = None
        if gsource is None:
            table = SequencesTable(open_input(seqs if seqs is not None else "-"))
            sources.insert(0, table.source)
        g = resolve_grammar(gsource, table)
        result = corr.exact_correlation(g, mode, max_distance)
    else:
        table = SequencesTable(open_input(seqs if seqs is not None else "-"))
        sources.insert(0, table.source)
        g = resolve_grammar(gsource, table, required=mode == "tree")
        excluded = [SequencesTable(open_input(p)) for p in exclude or []]
        sources += [t.source for t in excluded]
        result = _measure(corr, table, g, mode, vocab, max_distance, column, batch_size, excluded)
    if out is not None:
        prov = provenance("correlate", None, sources)
        results = results_table(corr.results_columns(result), kind=RESULTS_KIND, tags=tags, provenance=prov,
                                grammar=g.to_json() if g is not None else None, mode=result.mode,
                                vocab=result.vocab, n=result.n, column=column)
        write_results(results, out, force)
    if json_out:
        emit_json(result.to_json())
        return
    if out is not None:
        return  # the table holds the results; stdout stays free
    tree = result.mode.endswith("tree")
    header = ("lca_level" if tree else "distance", "correlation", "noise_floor", "pairs", "theory")
    theory = result.theory or [None] * len(result.distance)
    rows = [(str(t), fmt(c), fmt(nf), "-" if p is None else str(p), fmt(th))
            for t, c, nf, p, th in zip(result.distance, result.correlation, result.noise_floor, result.pairs, theory)]
    emit_table(rows, header)


def _measure(corr, table, g, mode, vocab, max_distance, column, batch_size, excluded=()):
    """Resolve v and the sequence length (one cheap scan when the file does not tell), then count
    (without the rows of `excluded` tables, when given)."""
    from cgtools.errors import InputError
    from cgtools.formats.sequences import TOKENS

    where = f"{table.display()}: column '{column}'" if column != TOKENS else table.display()
    v = vocab if vocab is not None else (g.vocab if g is not None else table.meta.get("vocab"))
    length = table.fixed_length if column == TOKENS else None
    if mode == "tree":
        length = g.length
    rows, tokens = table.num_rows, None
    if v is None or length is None:
        rows, tokens, longest, top = corr.scan(table.iter_column(column, batch_size=batch_size))
        if rows == 0 or top < 0:
            raise InputError(f"{where}: no sequences")
        v = top + 1 if v is None else v
        length = longest if length is None else length
    if tokens is None:
        tokens = rows * length
    fixed = None if mode == "pooled" else length

    def open_batches():
        return table.iter_column(column, batch_size=batch_size, length=fixed)

    if excluded:
        left_out = corr.sequence_set((t.iter_column(column, batch_size=batch_size, length=length) for t in excluded),
                                     length)
        unfiltered = open_batches

        def open_batches():  # noqa: F811 (the filtered stream replaces the plain one)
            return corr.without_rows(unfiltered(), left_out)

    # The App. A prediction describes the visible tokens of the grammar, not another column.
    theory_grammar = g if column == TOKENS and g is not None and length == g.length else None
    return corr.correlate(open_batches, vocab=v, mode=mode, length=length, max_distance=max_distance,
                          grammar=theory_grammar if mode != "tree" else g, where=where, total=rows,
                          tokens_hint=tokens)
