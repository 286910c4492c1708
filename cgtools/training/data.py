"""Training data streams whose batch at step k depends only on (seed, k).

Because no stream carries hidden state from step to step, a run resumed at step k draws exactly
the batches an uninterrupted run would have drawn, and every DDP rank can rebuild the global batch
and keep its own slice.
"""

from __future__ import annotations

import numpy as np
import torch

from cgtools.grammar.derivations import KeyLayout, expand, key_rows
from cgtools.grammar.parse import Parser
from cgtools.grammar.rhm import Grammar
from cgtools.seeding import generator


class OfflineData:
    """A fixed set of P sentences, reshuffled every epoch.

    The global batch of step k holds examples k·B … k·B+B−1 of the endless sequence
    perm_0, perm_1, … where perm_e is the permutation of epoch e (a batch may straddle two epochs,
    and when P < B it spans several).
    """

    def __init__(self, tokens: np.ndarray, batch_size: int, seed: int) -> None:
        self.tokens = as_examples(tokens)  # [P, d] long, or [P, C, H, W] float32
        self.batch_size, self.seed = batch_size, seed
        self._perms: dict[int, np.ndarray] = {}

    @property
    def size(self) -> int:
        return self.tokens.shape[0]

    def _perm(self, epoch: int) -> np.ndarray:
        if epoch not in self._perms:
            if len(self._perms) > 4:
                self._perms.pop(min(self._perms))
            self._perms[epoch] = generator(self.seed, "epoch", epoch).permutation(self.size)
        return self._perms[epoch]

    def batch(self, step: int) -> torch.Tensor:
        """Global batch of `step`: long [B, d] (tokens) or float32 [B, C, H, W] (images)."""
        pos = step * self.batch_size + np.arange(self.batch_size)
        epochs, within = np.divmod(pos, self.size)
        idx = np.empty(self.batch_size, dtype=np.int64)
        for e in np.unique(epochs):
            sel = epochs == e
            idx[sel] = self._perm(int(e))[within[sel]]
        return self.tokens[torch.from_numpy(idx)]


class OnlineData:
    """Fresh uniformly random sentences at every step (drawn with replacement), never one of `exclude`.

    A uniformly random derivation is a uniformly random sentence (the map is one-to-one), so rows
    are drawn as a random root class and random productions; rows equal to an excluded sentence
    (e.g. the validation set) are redrawn.
    """

    def __init__(self, grammar: Grammar, batch_size: int, seed: int,
                 exclude: np.ndarray | None = None) -> None:
        self.grammar, self.batch_size, self.seed = grammar, batch_size, seed
        self.layout = KeyLayout.for_grammar(grammar)
        self.parser = Parser(grammar)
        self.exclude = None
        if exclude is not None and len(exclude):
            keys = self.parser.keys(self.parser.parse(np.asarray(exclude)))
            self.exclude = key_rows(keys)

    def batch(self, step: int) -> torch.Tensor:
        g, rng = self.grammar, generator(self.seed, "online", step)
        out = np.empty((self.batch_size, g.length), dtype=np.int64)
        todo = np.arange(self.batch_size)
        while todo.size:
            classes = rng.integers(0, g.n_classes, todo.size)
            digits = rng.integers(0, g.synonyms, (todo.size, g.n_internal))
            ok = np.ones(todo.size, dtype=bool)
            if self.exclude is not None:
                ok = ~np.isin(key_rows(self.layout.encode(classes, digits)), self.exclude)
            out[todo[ok]] = expand(g, classes[ok], digits[ok])[0]
            todo = todo[~ok]
        return torch.from_numpy(out)


def as_examples(data: np.ndarray) -> torch.Tensor:
    """Training examples as a tensor: token ids as long, continuous data (images) as float32."""
    a = np.asarray(data)
    return torch.as_tensor(a.astype(np.float32 if np.issubdtype(a.dtype, np.floating) else np.int64, copy=False))


def rank_slice(batch: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    """This process's share of a global batch (contiguous blocks; B must divide by world)."""
    per = batch.shape[0] // world
    return batch[rank * per:(rank + 1) * per]
