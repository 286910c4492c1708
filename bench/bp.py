"""Benchmark of exact belief propagation: sentences/s of a full up/down pass, against two baselines.

Grammar (L, s, v, m) = (4, 2, 16, 4) by default; observations are grammatical sentences noised
uniformly at E = 0.3. Measured in the same run:

* cgtools BP: the core up+down pass (all messages of every level, log-likelihood, underflow
  check), then the public `infer` (evidence construction and layout included), `infer` plus
  every level's marginals, and upward pass plus an exact posterior sample.
* matmul bound: the pass performs F multiply/add operations per sentence (counted below); a
  dense float32 GEMM on this machine sustains R flop/s, so no implementation of the same
  arithmetic can beat B·F/R seconds. Reported: time / bound (≥ 1; lower is better).
* dense-downward baseline: the same BP with the downward pass written as in the authors' public
  code (peers.md §5): a dense [v, n·m, nodes, s, B] scatter then a sum over rules.

Usage: python bench/bp.py [--shape 4 2 16 4] [--batch 16384] [--repeat 5] [--threads N]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from cgtools.grammar.rhm import draw_grammar
from cgtools.grammar.sampling import generate_sentences
from cgtools.diffusion import UniformConfig, make_process
from cgtools.inference.bp import BeliefPropagation
from timing import best_of  # bench/timing.py (the script's own folder is on sys.path)


def flops_per_sentence(g) -> int:
    """Multiplies and adds of one up+down pass (normalisations excluded)."""
    s, m, total = g.branching, g.synonyms, 0
    for level in range(1, g.depth + 1):
        nm, w = g.symbols(level) * m, g.width(level)
        total += w * (nm * (s - 1) + nm)  # upward: s-fold products, sum over productions
        total += w * s * (nm * (s - 1) + nm)  # downward: leave-one-out products, scatter-add
    return total


def gemm_rate(repeat: int) -> float:
    """Sustained float32 GEMM flop/s (2 n^3 per product)."""
    n = 1024
    a, b = torch.rand(n, n), torch.rand(n, n)
    return 2 * n**3 / best_of(repeat, lambda: a @ b)


def dense_downward(g, up: list[torch.Tensor]) -> list[torch.Tensor]:
    """The downward pass with a dense [v, n*m, w, s, B] tensor (peers.md §5); natural order,
    messages [symbols, w, B]. For comparison only."""
    s, m, v = g.branching, g.synonyms, g.vocab
    b = up[0].shape[-1]
    down = [None] * (g.depth + 1)
    down[g.depth] = torch.full((g.n_classes, 1, b), 1.0 / g.n_classes)
    for level in range(g.depth, 0, -1):
        w, rules = g.width(level), torch.from_numpy(g.rules[level - 1]).reshape(-1, s)  # [n*m, s]
        child = up[level - 1].view(v, w, s, b)
        gathered = torch.stack([child[:, :, j][rules[:, j]] for j in range(s)], 2)  # [n*m, w, s, B]
        parent = down[level].repeat_interleave(m, 0)  # [n*m, w, B]
        dense = torch.zeros((v, rules.shape[0], w, s, b))
        for j in range(s):
            others = torch.cat([gathered[:, :, :j], gathered[:, :, j + 1:]], 2).prod(2)  # [n*m, w, B]
            dense[rules[:, j], torch.arange(rules.shape[0]), :, j, :] = parent * others
        d = dense.sum(1).reshape(v, w * s, b)
        down[level - 1] = d / d.sum(0, keepdim=True)
    return down


def natural_upward(g, lik: torch.Tensor) -> list[torch.Tensor]:
    """Upward pass in natural node order (for the dense baseline): messages [symbols, w, B]."""
    s, m = g.branching, g.synonyms
    u = lik.permute(2, 1, 0).contiguous()
    up = [u / u.sum(0, keepdim=True)]
    for level in range(1, g.depth + 1):
        w, rules = g.width(level), torch.from_numpy(g.rules[level - 1]).reshape(-1, s)
        child = up[-1].view(g.vocab, w, s, -1)
        prod = child[:, :, 0][rules[:, 0]]
        for j in range(1, s):
            prod = prod * child[:, :, j][rules[:, j]]
        x = prod.view(-1, m, w, prod.shape[-1]).sum(1)
        up.append(x / x.sum(0, keepdim=True))
    return up


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", type=int, nargs=4, default=[4, 2, 16, 4], metavar=("L", "s", "v", "m"))
    ap.add_argument("--batch", type=int, default=16384)
    ap.add_argument("--dense-batch", type=int, default=1000, help="batch of the dense baseline")
    ap.add_argument("--noise", type=float, default=0.3)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    g = draw_grammar(*args.shape, seed=0)
    bp = BeliefPropagation(g)
    gen = torch.Generator().manual_seed(0)
    clean = torch.from_numpy(np.concatenate([b.tokens for b in generate_sentences(g, args.batch, seed=1)]))
    noise = make_process(UniformConfig(), g.vocab)
    x = noise.corrupt(clean, args.noise, gen)
    lik, _ = noise.leaf_evidence(x, args.noise)
    leaves = bp._internal(lik, bp.dtype)
    B = args.batch
    rows = []
    with torch.inference_mode():
        t_core = best_of(args.repeat, lambda: bp._fast(leaves, True))
        t_up = best_of(args.repeat, lambda: bp._fast(leaves, False))
        t_infer = best_of(args.repeat, lambda: bp.infer(x, args.noise, noise))
        t_marg = best_of(args.repeat, lambda: bp.infer(x, args.noise, noise).marginals())
        t_sample = best_of(args.repeat, lambda: bp.sample(bp.infer(x, args.noise, noise, downward=False), gen))
        rate = gemm_rate(args.repeat)
        f = flops_per_sentence(g)
        bound = B * f / rate
        nb = min(args.dense_batch, B)
        lik_d = lik[:nb]
        t_dense = best_of(args.repeat, lambda: dense_downward(g, natural_upward(g, lik_d)))
        t_ours_small = best_of(args.repeat, lambda: bp._fast(leaves[..., :nb].contiguous(), True))
    rows = [("up+down pass (core)", B / t_core), ("upward pass only", B / t_up),
            ("infer() (evidence + up + down)", B / t_infer), ("infer() + marginals of all levels", B / t_marg),
            ("upward + exact posterior sample", B / t_sample)]
    print(f"grammar (L, s, v, m) = {tuple(args.shape)}, E = {args.noise}, batch {B}, "
          f"torch threads {torch.get_num_threads()}")
    for name, r in rows:
        print(f"  {name:36s} {r:12,.0f} sentences/s")
    print(f"matmul bound: {f} flops/sentence, GEMM {rate / 1e9:.1f} GFLOP/s -> "
          f"{B / bound:,.0f} sentences/s; core pass / bound = {t_core / bound:.1f}x "
          f"({B * f / t_core / 1e9:.2f} GFLOP/s achieved)")
    print(f"dense-downward baseline (batch {nb}): {nb / t_dense:,.0f} sentences/s; "
          f"cgtools at the same batch {nb / t_ours_small:,.0f}/s: {t_dense / t_ours_small:.1f}x faster")
    per_sentence = sum(2 * g.symbols(lv) * g.width(lv) for lv in range(g.depth + 1)) * 4
    print(f"memory: {per_sentence} bytes of stored messages per sentence (linear in the batch) "
          f"+ fixed blocks of {bp._block_size()} sentences for temporaries")


if __name__ == "__main__":
    main()
