"""The results tables of a sweep as one tidy table, with the grammar's parameters as columns.

Tables of a sweep carry their run's labels as tags (constant columns: P, seed, m, ...); a table
whose grammar metadata gives L, s, v or m without the tag gets that column from the grammar
(depth, branching, vocab, synonyms), so sweeps can be grouped by grammar parameters whether or
not they were tagged.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import pyarrow as pa

from cgtools.errors import InputError
from cgtools.formats.results import Results, concat_results

# column name -> key of the grammar object (DESIGN.md §3)
GRAMMAR_TAGS = {"L": "depth", "s": "branching", "v": "vocab", "m": "synonyms"}


@dataclass
class Sweep:
    """A sweep's rows as one table, the kind of its tables and the tag names seen (in order)."""

    table: pa.Table
    kind: str
    tags: list[str]

    def rows(self) -> list[dict]:
        return self.table.to_pylist()


def with_grammar_columns(result: Results) -> pa.Table:
    """result.table plus L, s, v, m columns from its grammar metadata where not already columns."""
    table = result.table
    grammar = result.meta.get("grammar") or {}
    for name, key in GRAMMAR_TAGS.items():
        value = grammar.get(key)
        if name not in table.column_names and isinstance(value, int) and not isinstance(value, bool):
            table = table.append_column(name, pa.array([value] * table.num_rows, pa.int64()))
    return table


def sweep_table(results: Sequence[Results]) -> Sweep:
    """Concatenate results tables of one kind (InputError when kinds differ or none is given)."""
    if not results:
        raise InputError("no results tables given")
    first = results[0]
    tags = list(dict.fromkeys(t for r in results for t in r.tags))
    tables = []
    for r in results:
        if r.kind != first.kind:
            raise InputError(f"{r.where} holds {r.kind!r} results but {first.where} holds "
                             f"{first.kind!r}; give tables of one kind")
        table = with_grammar_columns(r)
        tags += [c for c in table.column_names if c in GRAMMAR_TAGS and c not in tags]
        tables.append(Results(table, r.meta, r.where))
    return Sweep(concat_results(tables), first.kind, tags)
