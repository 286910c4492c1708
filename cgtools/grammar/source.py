"""Where a command's grammar comes from: `--grammar FILE`, else its input, else a clear error.

Every command that needs a grammar resolves it here, so the rule ("the grammar given with
--grammar wins; otherwise the one embedded in the input; otherwise fail naming the input") and
its messages are written once. Files carry the grammar as a JSON object (cgtools.formats);
this module turns it into a :class:`~cgtools.grammar.rhm.Grammar`.
"""

from __future__ import annotations

from dataclasses import dataclass

from cgtools.errors import InputError, SchemaError
from cgtools.formats.files import InputFile
from cgtools.formats.grammar_file import grammar_json_of, write_grammar_file
from cgtools.grammar.rhm import Grammar


@dataclass(frozen=True)
class Carrier:
    """An input that may embed a grammar: its display name and its grammar JSON (or None)."""

    where: str
    grammar: dict | None


def carrier(obj) -> Carrier:
    """A Carrier from a SequencesTable, a Checkpoint, a loaded model, or a (where, json) pair."""
    if isinstance(obj, Carrier):
        return obj
    if isinstance(obj, tuple):
        return Carrier(*obj)
    if hasattr(obj, "grammar_json"):  # SequencesTable
        return Carrier(obj.display(), obj.grammar_json())
    meta = getattr(obj, "meta", None)
    if isinstance(meta, dict):  # Checkpoint, DiffusionModel
        where = obj.source.display() if hasattr(obj, "source") else str(meta.get("path", "the model"))
        return Carrier(where, meta.get("grammar") or None)
    raise TypeError(f"cannot read a grammar from {type(obj).__name__}")


def grammar_from_json(obj: dict, where: str) -> Grammar:
    """Grammar.from_json with the file named in the error."""
    try:
        return Grammar.from_json(obj)
    except SchemaError as exc:
        raise SchemaError(f"{where}: {exc}") from None


def load_grammar(source: InputFile) -> Grammar:
    """The grammar carried by any cgtools file (sequences table, grammar file, checkpoint)."""
    return grammar_from_json(grammar_json_of(source), source.display())


def resolve_grammar(explicit: InputFile | None, *inputs, required: bool = True) -> Grammar | None:
    """The grammar of a command: from `explicit` (--grammar FILE) if given, else from the first of
    `inputs` that carries one (see :func:`carrier`). With required, InputError naming the inputs
    when there is none; otherwise None."""
    if explicit is not None:
        return load_grammar(explicit)
    carriers = [carrier(x) for x in inputs if x is not None]
    for c in carriers:
        if c.grammar:
            return grammar_from_json(c.grammar, c.where)
    if not required:
        return None
    names = " nor ".join(c.where for c in carriers) or "the input"
    raise InputError(f"{names} carries no grammar; give --grammar FILE")


def check_same_grammar(grammar: Grammar, other, what: str = "was drawn from a different grammar") -> None:
    """InputError if `other` (a carrier) embeds a grammar with other rules than `grammar`."""
    c = carrier(other)
    if c.grammar and not grammar_from_json(c.grammar, c.where).same_rules(grammar):
        raise InputError(f"{c.where} {what}")


def save_grammar(grammar: Grammar, name: str, force: bool, provenance: dict) -> None:
    """Write `grammar` as a grammar safetensors file (DESIGN.md §3)."""
    write_grammar_file(grammar.tensors(), grammar.to_json(), name, force, provenance)
