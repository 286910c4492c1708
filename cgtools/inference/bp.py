"""Exact inference on the Random Hierarchy Model by belief propagation (BP) on its tree.

Knowing the rules, the posterior of every leaf and latent given a noisy sentence x_t is exact: the
RHM is a tree-structured graphical model (root uniform over n_classes symbols, every node picks one
of its m productions uniformly). This module computes, for a batch of observations,

* upward messages   U_l(a) ∝ P(evidence below a level-l node | node = a)  (subtree likelihoods),
* outside messages  D_l(a) ∝ P(node = a, evidence outside its subtree)   (downward messages),
* marginals         P(node = a | x_t) ∝ U_l(a) D_l(a), at every level,
* the leaf *cavity* P(x0_i = a | x_t without token i) = D_0 (what a D3PM x0-network should output),
* log P(x_t), exactly, and exact posterior samples of the whole tree (top-down).

Evidence (leaf likelihood λ_i(a) = p(x_t_i | x0_i = a)) comes from the noise process
(:meth:`cgtools.diffusion.base.Process.leaf_evidence`): uniform noise gives
λ_i(a) = (1 - E)[a = x_t_i] + E/v, masking gives λ = 1 at a masked leaf and [a = x_t_i] elsewhere
(log P(x_t) then adds n_masked log E + n_kept log(1-E)). Any other leaf likelihood [B, d, v]
goes through :meth:`BeliefPropagation.infer_evidence`.

Numerics. The fast path works in probability space in `dtype` (float32 by default) with per-node
rescaling (every message sums to 1 over symbols; the log normalisers add up to log P(x_t)), so
depth is no issue. A sentence for which some normaliser falls below a safe floor (extreme
evidence, float underflow) is recomputed by an exact log-space float64 path. A sentence whose
likelihood is exactly 0 (hard evidence that no grammatical sentence matches: E = 0 with an
ungrammatical x_t, or unmasked tokens no sentence contains) gets log P = -inf and the *limit*
posterior: impossible leaf symbols are given an infinitesimal likelihood δ → 0, i.e. the posterior
is uniform-by-weight over the grammatical sentences that violate the fewest hard constraints
(for E = 0: the nearest sentences in Hamming distance, the E → 0+ limit). No NaN in any case.

Cost: a full up/down pass is O(d·v·m·s) per sentence (gathers and index_add over the rule table;
never a dense [v, v·m, ...] tensor) and memory is linear in the batch.

Layout: internally the messages of level l are [symbols_l, w_l, B] (w_l = s^(L-l) nodes) with the
nodes in *digit-reversed* order, so that the s children of all parents form s contiguous blocks
[:, j, :, :] and no transpose is ever needed. Public accessors return [B, w_l, symbols_l] in natural
left-to-right order, the convention of cgtools.grammar (level 0 = tokens, level L = root).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from cgtools.diffusion.base import CategoricalProcess, noise_vector
from cgtools.errors import ConfigError, InputError
from cgtools.grammar.rhm import Grammar

# Log-space penalty (nats) given to a zero leaf likelihood when the whole observation is
# impossible: exp(-PENALTY) underflows to 0 next to any O(1) term in float64, which realises the
# δ → 0 limit exactly while keeping every number finite.
_PENALTY = 1000.0
# Below these normalisers the fast path may have lost precision to underflow: recompute in log space.
_SAFE_FLOOR = {torch.float32: 1e-30, torch.float64: 1e-280}
_ITEMSIZE = {torch.float32: 4, torch.float64: 8}
_BLOCK_BYTES = 1 << 22  # target size of the largest temporary of the fast path
_MAX_BLOCK = 1 << 16


def check_grammar_process(grammar: Grammar, process: CategoricalProcess) -> None:
    """ConfigError unless `process` is a token process over the grammar's v symbols."""
    if not isinstance(process, CategoricalProcess):
        raise ConfigError(f"exact inference needs a token noise process, not {getattr(process, 'name', type(process).__name__)} noise")
    if process.vocab != grammar.vocab:
        raise ConfigError(f"the noise process has {process.vocab} symbols but the grammar v = {grammar.vocab}")


def _reversed_order(width: int, s: int) -> torch.Tensor:
    """Digit-reversal permutation of range(width), width = s^k (an involution)."""
    k = round(math.log(width, s)) if width > 1 else 0
    idx = np.arange(width)
    digits = [(idx // s**p) % s for p in range(k)]  # least significant first
    rev = np.zeros(width, dtype=np.int64)
    for p, dig in enumerate(digits):
        rev += dig * s ** (k - 1 - p)
    return torch.from_numpy(rev)


@dataclass
class _Pass:
    """Messages of one batch in the internal layout ([symbols_l, w_l, B], digit-reversed nodes).

    Probabilities normalised over symbols (fast path), or their logs (log-space path).
    """

    up: list[torch.Tensor]  # l = 0..L
    down: list[torch.Tensor] | None  # l = 0..L; down[L] is the root prior
    log_likelihood: torch.Tensor  # [B] float64


class Beliefs:
    """BP results for a batch of B observations (see the module docstring for definitions).

    Accessors return float tensors [B, w_l, symbols_l] in natural node order (level 0 = the d
    leaves, level L = the root); every row sums to 1 over symbols.
    `log_likelihood` [B] float64 is log P(x_t) (-inf when the observation is impossible);
    `fallback` [B] bool marks sentences computed by the exact log-space path.
    """

    def __init__(self, bp: "BeliefPropagation", msgs: _Pass, fallback: torch.Tensor,
                 logs: _Pass | None = None) -> None:
        self._bp = bp
        self._m = msgs
        self.log_likelihood = msgs.log_likelihood
        self.fallback = fallback
        # Log-space messages (float64) of the fallback rows: products of their probabilities may
        # underflow (e.g. in the δ → 0 limit), so marginals and samples of these rows use logs.
        self._rows = fallback.nonzero().squeeze(1)
        self._logs = logs

    @property
    def batch(self) -> int:
        return int(self.log_likelihood.shape[0])

    def _public(self, t: torch.Tensor, level: int) -> torch.Tensor:
        # [n, w, B] digit-reversed -> [B, w, n] natural (the reversal is its own inverse)
        return t.index_select(1, self._bp._order[level]).permute(2, 1, 0).contiguous()

    def upward(self, level: int) -> torch.Tensor:
        """Normalised subtree likelihoods U_l [B, w_l, n_l] (level 0: the leaf likelihoods)."""
        return self._public(self._m.up[level], level)

    def outside(self, level: int) -> torch.Tensor:
        """Normalised outside (downward) messages D_l [B, w_l, n_l]; level L is the root prior."""
        if self._m.down is None:
            raise ConfigError("outside messages need the downward pass (infer(..., downward=True))")
        return self._public(self._m.down[level], level)

    def marginal(self, level: int) -> torch.Tensor:
        """Posterior marginals P(node = a | x_t) [B, w_l, n_l]."""
        if self._m.down is None:
            raise ConfigError("marginals below the root need the downward pass")
        prod = self._m.up[level] * self._m.down[level]
        prod /= prod.sum(0, keepdim=True)
        if self._logs is not None:
            lp = self._logs.up[level] + self._logs.down[level]
            prod[..., self._rows] = torch.exp(lp - _lse(lp, 0).unsqueeze(0)).to(prod.dtype)
        return self._public(prod, level)

    def probability(self, level: int, symbols: torch.Tensor) -> torch.Tensor:
        """Posterior probability [B, w_l] that each level-l node holds the given symbol
        (symbols long [B, w_l]); cheaper than indexing :meth:`marginal`."""
        if self._m.down is None:
            raise ConfigError("marginals below the root need the downward pass")
        idx = symbols.index_select(1, self._bp._order[level]).T.unsqueeze(0)  # [1, w, B] digit-reversed
        up, down = self._m.up[level], self._m.down[level]
        num = torch.gather(up, 0, idx) * torch.gather(down, 0, idx)  # [1, w, B]
        p = (num / (up * down).sum(0, keepdim=True))[0]
        if self._logs is not None:
            lp = self._logs.up[level] + self._logs.down[level]
            exact = torch.gather(lp, 0, idx[..., self._rows]) - _lse(lp, 0).unsqueeze(0)
            p[:, self._rows] = torch.exp(exact[0]).to(p.dtype)
        return p.index_select(0, self._bp._order[level]).T

    def marginals(self) -> list[torch.Tensor]:
        """Marginals of every level, l = 0..L."""
        return [self.marginal(level) for level in range(self._bp.grammar.depth + 1)]

    def cavity(self) -> torch.Tensor:
        """Leaf cavities P(x0_i = a | x_t without token i) [B, d, v] (normalised outside messages)."""
        return self.outside(0)

    def root(self) -> torch.Tensor:
        """Posterior of the root class [B, n_classes] (needs only the upward pass)."""
        return self._public(self._m.up[-1], self._bp.grammar.depth)[:, 0, :]


class BeliefPropagation:
    """Exact BP for one grammar. Reuse the object: it holds the rule index tables.

    `dtype` is the working precision of the fast path (float32 or float64).
    """

    def __init__(self, grammar: Grammar, dtype: torch.dtype = torch.float32) -> None:
        if dtype not in (torch.float32, torch.float64):
            raise ConfigError(f"BP works in float32 or float64, not {dtype}")
        self.grammar = grammar
        self.dtype = dtype
        g = grammar
        # idx[l-1][j]: the j-th child symbol of every (a, k), flattened a-major: [n_l * m] int64
        self._idx = [[torch.from_numpy(np.ascontiguousarray(r[:, :, j].reshape(-1)))
                      for j in range(g.branching)] for r in g.rules]
        self._rules = [torch.from_numpy(np.ascontiguousarray(r)) for r in g.rules]  # [n_l, m, s]
        self._order = [_reversed_order(g.width(level), g.branching) for level in range(g.depth + 1)]

    # ---- public entry points -----------------------------------------------------------------
    @torch.inference_mode()
    def infer(self, x_t: torch.Tensor, noise: float | torch.Tensor, process: CategoricalProcess,
              *, downward: bool = True) -> Beliefs:
        """BP on observations x_t long [B, d] corrupted by `process` at noise E.

        `noise` is a scalar or one E per sentence [B]; the leaf evidence is the process's. With
        downward=False only the upward pass runs: enough for log P(x_t), the root posterior and
        :meth:`sample`.
        """
        check_grammar_process(self.grammar, process)
        x_t = torch.as_tensor(x_t)
        e = noise_vector(noise, x_t.shape[0])
        x = x_t.index_select(1, self._order[0])  # [B, d], leaves in digit-reversed order
        leaves, const = process.leaf_evidence(x, e, self.dtype, symbols_first=True)  # [v, d, B], [B]

        def exact(rows: torch.Tensor) -> torch.Tensor:
            # float64 evidence for the sentences the fast path could not certify
            lik, _ = process.leaf_evidence(x.index_select(0, rows), e.index_select(0, rows),
                                           torch.float64, symbols_first=True)
            return lik

        return self._run(leaves, const, exact, downward)

    @torch.inference_mode()
    def infer_evidence(self, lik: torch.Tensor, log_const: torch.Tensor | None = None, *,
                       downward: bool = True) -> Beliefs:
        """BP from arbitrary non-negative leaf likelihoods lik [B, d, v]; log_const [B] is added to
        log P (use it for factors the likelihoods leave out)."""
        g = self.grammar
        if lik.ndim != 3 or lik.shape[1:] != (g.length, g.vocab):
            raise InputError(f"leaf likelihoods must be [B, {g.length}, {g.vocab}], got {tuple(lik.shape)}")
        b = lik.shape[0]
        const = torch.zeros(b, dtype=torch.float64) if log_const is None else log_const.to(torch.float64)

        def exact(rows: torch.Tensor) -> torch.Tensor:
            return self._internal(lik.index_select(0, rows), torch.float64)

        return self._run(self._internal(lik, self.dtype), const, exact, downward)

    def _internal(self, lik: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Leaf likelihoods [B, d, v] in the internal layout [v, d, B] (digit-reversed nodes)."""
        return lik.to(dtype).permute(2, 1, 0).index_select(1, self._order[0]).contiguous()

    def _run(self, leaves: torch.Tensor, const: torch.Tensor, exact, downward: bool) -> Beliefs:
        """Fast pass on leaves [v, d, B]; sentences it cannot certify are redone from
        exact(rows) -> float64 leaves [v, d, R] in log space."""
        msgs, bad = self._fast(leaves, downward)
        msgs.log_likelihood += const
        logs = None
        if bad.any():
            rows = bad.nonzero().squeeze(1)
            logs = self._log_space(exact(rows), downward)
            logs.log_likelihood += const[rows]
            _scatter_rows(msgs, logs, rows, self.dtype)
        return Beliefs(self, msgs, bad, logs)

    @torch.inference_mode()
    def sample(self, beliefs: Beliefs, generator: torch.Generator) -> list[torch.Tensor]:
        """One exact posterior sample of the whole tree per observation.

        Returns nodes[l] long [B, w_l] for l = 0..L (nodes[0] = the tokens, nodes[L] = the root),
        the layout of cgtools.grammar.derivations.expand. Top-down: the root from its posterior,
        then each node's production with probability ∝ Π_j U(child_j = rule_j).
        """
        g = self.grammar
        nodes = self._sample_tree(beliefs._m.up, False, generator)
        if beliefs._logs is not None:
            rows = beliefs._rows
            exact = self._sample_tree(beliefs._logs.up, True, generator)
            for level in range(g.depth + 1):
                nodes[level][:, rows] = exact[level]
        return [nodes[level].index_select(0, self._order[level]).T.contiguous()
                for level in range(g.depth + 1)]

    def _sample_tree(self, up: list[torch.Tensor], logs: bool, generator: torch.Generator) -> list[torch.Tensor]:
        """Top-down sampling from upward messages (probabilities, or their logs with logs=True);
        nodes[l] long [w_l, B] digit-reversed. Weights are combined in log space: a product of
        s small probabilities may underflow."""
        g, s, m = self.grammar, self.grammar.branching, self.grammar.synonyms
        b = up[0].shape[2]
        nodes: list[torch.Tensor] = [None] * (g.depth + 1)  # type: ignore[list-item]
        root = up[g.depth][:, 0, :]  # [n, B]
        sym = _draw(root if logs else torch.log(root), generator).unsqueeze(0)  # [1, B]
        nodes[g.depth] = sym
        for level in range(g.depth, 0, -1):
            w = g.width(level)
            flat = self._rules[level - 1].view(-1, m * s)  # [n, m*s]
            cand = flat.index_select(0, sym.reshape(-1)).view(w, b, m, s)  # children of every production
            child = up[level - 1].view(-1, s, w, b)  # [v, s, w, B]
            logw = torch.zeros((m, w, b), dtype=child.dtype)
            for j in range(s):
                picked = torch.gather(child[:, j], 0, cand[..., j].permute(2, 0, 1))  # [m, w, B]
                logw += picked if logs else torch.log(picked)
            k = _draw(logw, generator)  # [w, B]
            kids = torch.gather(cand, 2, k[..., None, None].expand(w, b, 1, s)).squeeze(2)  # [w, B, s]
            sym = kids.permute(2, 0, 1).reshape(s * w, b)  # [w_{l-1}, B] digit-reversed
            nodes[level - 1] = sym
        return nodes

    # ---- fast path: probability space with per-node rescaling --------------------------------
    def _block_size(self) -> int:
        """Sentences per block: the largest temporaries ([n*m, w_1, block]) stay a few MB
        (cache-resident; measured best at 4-8 MB on a 2-core EPYC). Larger blocks pay more in page
        faults and cache misses than in arithmetic, smaller ones in per-operation overhead."""
        g = self.grammar
        per_sentence = g.branching * g.symbols(1) * g.synonyms * g.width(1) * _ITEMSIZE[self.dtype]
        return int(min(max(_BLOCK_BYTES // per_sentence, 32), _MAX_BLOCK))

    def _fast(self, leaves: torch.Tensor, downward: bool) -> tuple[_Pass, torch.Tensor]:
        """leaves [v, d, B] -> normalised messages (in new tensors) and the rows to redo."""
        g = self.grammar
        b = leaves.shape[2]
        up = [torch.empty((g.symbols(level), g.width(level), b), dtype=self.dtype)
              for level in range(g.depth + 1)]
        down = None
        if downward:
            down = [torch.empty_like(u) for u in up]
            down[g.depth].fill_(1.0 / g.n_classes)
        loglik = torch.zeros(b, dtype=torch.float64)
        lowest = torch.empty(b, dtype=self.dtype)
        step = self._block_size()
        for start in range(0, b, step):
            sl = slice(start, min(start + step, b))
            self._fast_block(leaves[..., sl], [u[..., sl] for u in up],
                             None if down is None else [x[..., sl] for x in down],
                             loglik[sl], lowest[sl])
        loglik -= g.n_internal * math.log(g.synonyms) + math.log(g.n_classes)
        bad = ~(lowest >= _SAFE_FLOOR[self.dtype])  # also catches NaN
        return _Pass(up, down, loglik), bad

    def _fast_block(self, leaves: torch.Tensor, up: list[torch.Tensor], down: list[torch.Tensor] | None,
                    loglik: torch.Tensor, lowest: torch.Tensor) -> None:
        """One block of sentences; writes into the views up[l], down[l] ([n_l, w_l, b]), loglik
        and lowest ([b]: the smallest normaliser met, to detect underflow)."""
        g, s, m = self.grammar, self.grammar.branching, self.grammar.synonyms
        b = leaves.shape[2]
        z = leaves.sum(0)  # [d, b]
        lowest.copy_(z.amin(0))
        loglik.copy_(torch.log(z.to(torch.float64)).sum(0))
        torch.div(leaves, z, out=up[0])
        cache = []
        for level in range(1, g.depth + 1):
            w, idx = g.width(level), self._idx[level - 1]
            child = up[level - 1].view(-1, s, w, b)  # [v, s, w, b]
            gathered = [child[:, j].index_select(0, idx[j]) for j in range(s)]  # s x [n*m, w, b]
            prod = gathered[0] * gathered[1]
            for j in range(2, s):
                prod.mul_(gathered[j])
            u = prod.view(-1, m, w, b).sum(1)  # [n, w, b]
            z = u.sum(0)  # [w, b]
            torch.minimum(lowest, z.amin(0), out=lowest)
            loglik += torch.log(z.to(torch.float64)).sum(0)
            torch.div(u, z, out=up[level])
            if down is not None:
                cache.append(gathered)
        if down is None:
            return
        for level in range(g.depth, 0, -1):
            w, idx = g.width(level), self._idx[level - 1]
            parent = down[level].unsqueeze(1)  # [n, 1, w, b], broadcast over the m productions
            # index_add_ into a non-contiguous view is ~8x slower: add into [s, v, w, b], then
            # transpose while normalising.
            outs = torch.zeros((s, g.vocab, w, b), dtype=self.dtype)
            for j, rest in enumerate(_leave_one_out(cache[level - 1], in_place=True)):
                t = rest.view(-1, m, w, b).mul_(parent).view(-1, w, b)  # [n*m, w, b]
                outs[j].index_add_(0, idx[j], t)  # [v, w, b]
            z = outs.sum(1)  # [s, w, b]
            torch.minimum(lowest, z.amin((0, 1)), out=lowest)
            torch.div(outs.permute(1, 0, 2, 3), z, out=down[level - 1].view(g.vocab, s, w, b))

    # ---- exact log-space path (float64) for the few sentences the fast path cannot handle ------
    def _log_space(self, leaves: torch.Tensor, downward: bool) -> _Pass:
        """leaves [v, d, B] float64 likelihoods -> log messages (float64), each node normalised."""
        log_leaves = torch.log(leaves)
        first = self._log_pass(log_leaves, downward)
        impossible = torch.isneginf(first.log_likelihood)
        if impossible.any():
            # δ → 0 limit: zero likelihoods become e^-PENALTY; keep log P = -inf.
            rows = impossible.nonzero().squeeze(1)
            soft = log_leaves.index_select(2, rows).clamp(min=-_PENALTY)
            second = self._log_pass(soft, downward)
            second.log_likelihood.fill_(-math.inf)
            _replace_rows(first, second, rows)
        return first

    def _log_pass(self, log_leaves: torch.Tensor, downward: bool) -> _Pass:
        g, s, m = self.grammar, self.grammar.branching, self.grammar.synonyms
        b = log_leaves.shape[2]
        lz = _lse(log_leaves, 0)  # [d, B]
        loglik = lz.sum(0)
        up = [log_leaves - _finite(lz)]
        cache = []
        for level in range(1, g.depth + 1):
            w = g.width(level)
            child = up[-1].view(-1, s, w, b)
            gathered = [child[:, j].index_select(0, self._idx[level - 1][j]) for j in range(s)]
            total = sum(gathered[1:], gathered[0])  # [n*m, w, B]
            u = _lse(total.view(-1, m, w, b), 1)  # [n, w, B]
            lz = _lse(u, 0)
            loglik = loglik + lz.sum(0)
            up.append(u - _finite(lz))
            cache.append(gathered)
        loglik = loglik - (g.n_internal * math.log(m) + math.log(g.n_classes))
        down = None
        if downward:
            down = [None] * (g.depth + 1)  # type: ignore[list-item]
            down[g.depth] = torch.full((g.n_classes, 1, b), -math.log(g.n_classes), dtype=torch.float64)
            for level in range(g.depth, 0, -1):
                w = g.width(level)
                parent = down[level].unsqueeze(1)
                outs = torch.zeros((s, g.vocab, w, b), dtype=torch.float64)
                for j in range(s):
                    rest = sum((cache[level - 1][i] for i in range(s) if i != j),
                               torch.zeros_like(cache[level - 1][j]))
                    t = (rest.view(-1, m, w, b) + parent).view(-1, w, b)  # [n*m, w, B]
                    # logsumexp per *target* symbol: a shift shared by all targets would let a
                    # target whose terms are all far below the global maximum underflow to -inf,
                    # and that target may still win in the marginal (δ → 0 limit).
                    idx = self._idx[level - 1][j]
                    top = torch.full((g.vocab, w, b), -math.inf, dtype=torch.float64)
                    top.scatter_reduce_(0, idx.view(-1, 1, 1).expand_as(t), t, reduce="amax")
                    top = _finite(top)  # [v, w, B]
                    outs[j].index_add_(0, idx, torch.exp(t - top.index_select(0, idx)))
                    outs[j] = torch.log(outs[j]) + top
                d = outs.permute(1, 0, 2, 3).reshape(g.vocab, s * w, b)
                down[level - 1] = d - _finite(_lse(d, 0))
        return _Pass(up, down, loglik)


def _leave_one_out(factors: list[torch.Tensor], in_place: bool = False) -> list[torch.Tensor]:
    """For factors f_0..f_{s-1}: [Π_{i≠j} f_i for j] with prefix/suffix products (no division).

    Every returned tensor is new, except with in_place=True and s = 2 where they are the inputs
    (swapped) and the caller may overwrite them.
    """
    s = len(factors)
    if s == 2:
        return [factors[1], factors[0]] if in_place else [factors[1].clone(), factors[0].clone()]
    prefix = [None] * s
    acc = None
    for j in range(s):
        prefix[j] = acc
        acc = factors[j] if acc is None else acc * factors[j]
    out = [None] * s
    acc = None
    for j in range(s - 1, -1, -1):
        if prefix[j] is None:
            out[j] = acc
        elif acc is None:
            out[j] = prefix[j]
        else:
            out[j] = prefix[j] * acc
        acc = factors[j] if acc is None else acc * factors[j]
    return out  # type: ignore[return-value]


def _lse(x: torch.Tensor, dim: int) -> torch.Tensor:
    """logsumexp that returns -inf (not NaN) when every term is -inf."""
    top = x.amax(dim, keepdim=True)
    safe = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    return (torch.log(torch.exp(x - safe).sum(dim, keepdim=True)) + safe).squeeze(dim)


def _finite(x: torch.Tensor) -> torch.Tensor:
    """Replace -inf normalisers by 0 so impossible nodes stay -inf instead of becoming NaN."""
    return torch.where(torch.isfinite(x), x, torch.zeros_like(x))


def _draw(logw: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Sample an index along dim 0 with probability ∝ exp(logw): [K, ...] -> [...] long.

    A column whose weights are all zero (only possible through float underflow) draws uniformly.
    """
    top = logw.amax(0, keepdim=True)
    dead = ~torch.isfinite(top)
    w = torch.exp(logw - torch.where(dead, torch.zeros_like(top), top))
    w = torch.where(dead, torch.ones_like(w), w)  # [K, ...], max 1 per column
    cdf = torch.cumsum(w, 0)
    u = torch.rand(cdf.shape[1:], generator=generator, dtype=cdf.dtype) * cdf[-1]
    k = (cdf <= u.unsqueeze(0)).sum(0)
    # Rounding can push u onto cdf[-1]: never return an index of zero weight.
    ranks = torch.arange(logw.shape[0]).view((-1,) + (1,) * (logw.ndim - 1))
    last = torch.where(w > 0, ranks, 0).amax(0)
    return torch.minimum(k, last)


def _scatter_rows(dst: _Pass, src: _Pass, rows: torch.Tensor, dtype: torch.dtype) -> None:
    """Overwrite batch columns `rows` of dst's messages (probabilities) with src's (logs) and
    likelihoods (log-space path results and their δ → 0 limits alike)."""
    for a, c in zip(dst.up, src.up):
        a[..., rows] = torch.exp(c).to(dtype)
    if dst.down is not None and src.down is not None:
        for a, c in zip(dst.down, src.down):
            a[..., rows] = torch.exp(c).to(dtype)
    dst.log_likelihood[rows] = src.log_likelihood


def _replace_rows(dst: _Pass, src: _Pass, rows: torch.Tensor) -> None:
    """Overwrite batch columns `rows` of dst with src, both in the same representation."""
    for a, c in zip(dst.up, src.up):
        a[..., rows] = c
    if dst.down is not None and src.down is not None:
        for a, c in zip(dst.down, src.down):
            a[..., rows] = c
    dst.log_likelihood[rows] = src.log_likelihood
