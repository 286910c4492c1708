"""The perfect denoiser: exact BP as the x0-prediction of a discrete diffusion model on an RHM.

A diffusion model trained to optimality on RHM data predicts, for every token, a distribution
over its clean value given the noisy sentence. Knowing the grammar, BP computes it exactly, so
:class:`BPDenoiser` stands in for a perfectly trained network wherever a model is accepted.

Which distribution to output depends on how the sampler uses it. For the D3PM reverse kernel
built from a predicted x0 distribution p̂ (Austin et al. eq. 4):

    p(x_{t-1,i} = j | x_t) ∝ q(x_t,i | x_{t-1,i} = j) · (ᾱ_{t-1} p̂_j + (1 - ᾱ_{t-1}) / v),

the exact per-token reverse marginal is obtained with p̂ = the *cavity* p(x0_i | x_t without
token i): the factor q(x_t,i | ·) already carries token i's own evidence, so plugging the full
marginal p(x0_i | x_t) counts it twice (with the authors' public sampler: 2-10 % grammatical
samples with marginals, 97-99 % with cavities; shared/reference/peers.md §5). The cavity is
therefore the default (`kind="cavity"`); `kind="marginal"` gives p(x0_i | x_t), what a
cross-entropy-trained "predict x0" head estimates.
"""

from __future__ import annotations

from typing import Literal

import torch

from cgtools.errors import ConfigError
from cgtools.grammar.rhm import Grammar
from cgtools.diffusion.base import CategoricalProcess
from cgtools.inference.bp import BeliefPropagation, check_grammar_process

Kind = Literal["cavity", "marginal"]
KINDS: tuple[str, ...] = ("cavity", "marginal")


class BPDenoiser:
    """Exact x0-prediction by belief propagation.

    Construction: ``BPDenoiser(grammar, process, kind="cavity" | "marginal", dtype=torch.float32,
    batch_size=4096)`` with `process` the noise process (a cgtools.diffusion CategoricalProcess
    over the grammar's v symbols: its leaf evidence is what BP conditions on).

    Call: ``denoiser(x_t, corruption) -> log_probs``

    * ``x_t``: torch.LongTensor [B, d], token ids in [0, v); for the masked process the mask id
      is v.
    * ``corruption``: torch.Tensor [B] float (or a Python float for the whole batch): the
      per-sentence probability E that a token was redrawn uniformly (uniform process, E = 1 - ᾱ_t;
      a redrawn token may keep its value) or masked (masked process).
    * returns torch.Tensor [B, d, v] float32: natural-log probabilities over the clean token,
      normalised over the last axis. ``kind="cavity"``: log p(x0_i | x_t without token i) (the
      loss-optimal x0 prediction for the D3PM kernel, see the module docstring);
      ``kind="marginal"``: log p(x0_i | x_t). Symbols with probability exactly 0 get -inf; every
      position has at least one finite entry. An observation no grammatical sentence explains
      (hard evidence, e.g. E = 0 with an ungrammatical x_t) gets the δ → 0 limit of
      :mod:`cgtools.inference.bp` (the nearest grammatical sentences), never NaN.

    The grammar's rules are the model; no parameters, no training. Work is split into chunks of
    `batch_size` sentences (memory is linear in the chunk).
    """

    def __init__(self, grammar: Grammar, process: CategoricalProcess, kind: Kind = "cavity",
                 dtype: torch.dtype = torch.float32, batch_size: int = 4096) -> None:
        check_grammar_process(grammar, process)
        if kind not in KINDS:
            raise ConfigError(f"unknown denoiser output {kind!r}; expected one of {', '.join(KINDS)}")
        if batch_size < 1:
            raise ConfigError(f"batch size must be >= 1, got {batch_size}")
        self.grammar = grammar
        self.process = process
        self.kind = kind
        self.batch_size = batch_size
        self.bp = BeliefPropagation(grammar, dtype)

    @property
    def vocab(self) -> int:
        return self.grammar.vocab

    @property
    def mask_id(self) -> int | None:
        """The mask token id (v) for the masked process, None for the uniform one."""
        return self.process.mask_id

    def __call__(self, x_t: torch.Tensor, corruption: torch.Tensor | float) -> torch.Tensor:
        b = x_t.shape[0]
        e = torch.as_tensor(corruption, dtype=torch.float64)
        if e.ndim == 0:
            e = e.expand(b)
        out = torch.empty((b, self.grammar.length, self.grammar.vocab), dtype=torch.float32)
        for start in range(0, b, self.batch_size):
            stop = min(start + self.batch_size, b)
            beliefs = self.bp.infer(x_t[start:stop], e[start:stop], self.process)
            probs = beliefs.cavity() if self.kind == "cavity" else beliefs.marginal(0)  # [b, d, v]
            out[start:stop] = torch.log(probs).to(torch.float32)
        return out
