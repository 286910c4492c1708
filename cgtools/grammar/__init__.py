"""The Random Hierarchy Model: grammars, derivations, sampling and parsing."""

from cgtools.grammar.rhm import Grammar, draw_grammar

__all__ = ["Grammar", "draw_grammar"]
