"""The forward-backward experiment: noise clean sentences, denoise them exactly, compare trees.

For every clean sentence x0 (with its parse tree) and every noise level E: draw x_t from the
forward process (uniform: each token redrawn uniformly with probability E; masked: masked with
probability E), draw x̂0 from the posterior p(x0 | x_t) (exact BP, or a trained model), and compare
the two trees level by level.

Measured per noise level:
* changed[l], l = 0..L: fraction of level-l nodes whose symbol differs between the trees of x0
  and x̂0 (level 0 = tokens, level L = the root class). With a trained model, x̂0 is parsed;
  latents of an ungrammatical x̂0 that have no valid parse count as changed.
* root_kept = 1 - changed[L].
* changed_expected[l] (BP only): 1 - the mean posterior probability of the clean symbol. It has
  the same expectation as changed[l] (an exact posterior sample keeps a node with probability
  equal to its marginal at the clean symbol) and much less variance.
* dynamical correlations of the token-change indicators c_i = [x̂0_i != x0_i]: with
  μ_i = <c_i> and M_ij = <c_i c_j> averaged over sentences (and noise draws),
  C(r) = mean over i of (M_{i,i+r} - μ_i μ_{i+r}), r = 0..d-1 ("covariance", the default), or the
  same mean of the Pearson correlations (M_{i,i+r} - μ_i μ_{i+r}) / (σ_i σ_{i+r}) ("pearson";
  pairs with a constant indicator contribute 0). The susceptibility (correlation volume) is
  χ = Σ_{r=1}^{d-1} C(r); C(0) (the mean variance) is reported in the curve, not in χ.

Denoisers: exact BP by default (:class:`BPSampler`). Any (x0, E, generator) -> x̂0 [B, d]
function plugs in through :func:`tokens_sampler`; its outputs are parsed and latents without a
valid parse count as changed. Every sampler corrupts x0 at exactly E with the noise process
(process.corrupt). :func:`model_sampler` builds one for a trained diffusion model (or any object
with `.process` and `.denoiser()`, e.g. cgtools.training.generate.ExactModel): it runs
cgtools.diffusion.sampling.forward_backward, the function `cgtools sample --from` runs too, whose
reverse process starts at start = process.time_for_corruption(E):

* uniform: the level t ∈ 0..T whose corruption 1 - ᾱ_t is closest to E (the smaller t on a tie).
  The model thus assumes a corruption up to half a level gap (|E - (1 - ᾱ_t)|, at most 1/(2T)
  for linear-alpha, 1 - ᾱ_t = t/T) away from the true E; when the closest level is t = 0
  (E < (1 - ᾱ_1)/2, including E = 0) x̂0 = x_t unchanged. The last step (t_1 -> 0) takes the argmax
  unless final_step="sample".
* masked: the time t ∈ [0, 1] with 1 - α(t) = E exactly (E = 0: x̂0 = x_t); the last step samples.

`steps` respaces the reverse process: the start, then the points of process.time_grid(steps) below
it. A model gives nodes only, so `changed_expected` and `root_kept_expected` are None (they need
posterior marginals: BP only), and an ungrammatical x̂0 (`grammatical` < 1) has its unparsable
latents counted as changed, so `changed[l]` then also measures rule violations.

Randomness: one torch generator per (seed, noise value, chunk of sentences), so a noise level
gives the same draws whatever other levels the sweep holds; chunk size depends only on d.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass, field
from typing import Callable, Iterable, Literal, Protocol

import numpy as np
import pyarrow as pa
import torch

from cgtools.diffusion.base import CategoricalProcess, Process
from cgtools.diffusion.sampling import forward_backward as diffusion_forward_backward
from cgtools.errors import ConfigError, InputError
from cgtools.formats.results import results_table, write_results
from cgtools.grammar.parse import Parser
from cgtools.grammar.rhm import Grammar
from cgtools.inference.bp import BeliefPropagation, check_grammar_process
from cgtools.logs import progress, silent_bar
from cgtools.seeding import torch_generator

log = logging.getLogger(__name__)

RESULTS_KIND = "forward-backward"
CorrelationMode = Literal["covariance", "pearson", "none"]
CORRELATION_MODES: tuple[str, ...] = ("covariance", "pearson", "none")
# Correlations keep a d x d matrix of pair counts; beyond this length they need too much memory.
MAX_CORRELATION_LENGTH = 4096


@dataclass
class Denoised:
    """A denoiser's answer for a chunk: sampled trees and, optionally, clean-symbol probabilities.

    nodes[l]: int64 [B, w_l] symbols of the denoised tree (-1 where a latent has no valid parse).
    kept_probability[l]: float [B, w_l] posterior probability of the *clean* symbol (or None).
    """

    nodes: list[np.ndarray]
    kept_probability: list[np.ndarray] | None = None


class PosteriorSampler(Protocol):
    """Corrupts x0 at E and draws x̂0 ~ p(x0 | x_t). `clean` holds the clean trees (for kept
    probabilities only)."""

    def __call__(self, x0: torch.Tensor, noise: float, generator: torch.Generator,
                 clean: list[np.ndarray]) -> Denoised: ...


class BPSampler:
    """Exact posterior sampling by belief propagation (the perfect denoiser)."""

    def __init__(self, grammar: Grammar, process: CategoricalProcess, expected: bool = True) -> None:
        check_grammar_process(grammar, process)
        self.grammar = grammar
        self.process = process
        self.expected = expected
        self.bp = BeliefPropagation(grammar, torch.float32)

    def __call__(self, x0: torch.Tensor, noise: float, generator: torch.Generator,
                 clean: list[np.ndarray]) -> Denoised:
        x_t = self.process.corrupt(x0, noise, generator)
        beliefs = self.bp.infer(x_t, noise, self.process, downward=self.expected)
        nodes = [n.numpy() for n in self.bp.sample(beliefs, generator)]
        kept = None
        if self.expected:
            kept = []
            for level in range(self.grammar.depth + 1):
                prob = beliefs.probability(level, torch.from_numpy(clean[level]))  # [B, w]
                kept.append(prob.to(torch.float64).numpy())
        return Denoised(nodes, kept)


def tokens_sampler(grammar: Grammar,
                   denoise: Callable[[torch.Tensor, float, torch.Generator], torch.Tensor]) -> PosteriorSampler:
    """Wrap a token-level forward-backward (x0, E, generator) -> x̂0 [B, d] (e.g. a trained
    model's) into a PosteriorSampler: x̂0 is parsed, invalid latents are -1."""
    parser = Parser(grammar)

    def sampler(x0: torch.Tensor, noise: float, generator: torch.Generator,
                clean: list[np.ndarray]) -> Denoised:
        tokens = denoise(x0, noise, generator).numpy()
        return Denoised(parser.parse(tokens).symbols)

    return sampler


class DenoisingModel(Protocol):
    """What :func:`model_sampler` needs: a noise process and a denoiser (log p̂(x0 | x_t, t)).

    cgtools.training.trained.DiffusionModel and cgtools.training.generate.ExactModel qualify.
    """

    process: Process
    grammar: Grammar | None
    length: int | None  # sequence length it denoises (None: not fixed)

    def denoiser(self) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]: ...


def check_model(model: DenoisingModel, grammar: Grammar, expected: str | None = None, *,
                where: str = "the model", data: str = "the data", same_grammar: bool = True) -> None:
    """Refuse a model that cannot denoise this experiment's sentences.

    ConfigError if `expected` (the process name the user asked for, None = any) is not the
    model's; InputError if it is not a token model over the grammar's vocabulary, predicts
    another sequence length than `grammar`, or (with same_grammar) if its training grammar is
    missing or differs from `grammar` (Grammar.same_rules). `where` names the model, `data` the
    sentences.
    """
    process = model.process
    if expected is not None and expected != process.name:
        raise ConfigError(f"{where} was trained with {process.name} diffusion; use --process "
                          f"{process.name} (or leave --process out)")
    if not isinstance(process, CategoricalProcess):
        raise InputError(f"{where} was trained with {process.name} noise, not on tokens")
    if process.vocab != grammar.vocab:
        raise InputError(f"{where} predicts {process.vocab} symbols but the grammar has v = {grammar.vocab}")
    length = model.length
    if length is not None and length != grammar.length:
        raise InputError(f"{where} denoises sequences of length {length} but the grammar has "
                         f"d = {grammar.length}")
    if same_grammar:
        if model.grammar is None:
            raise InputError(f"{where} carries no grammar to check against {data}'s; "
                             f"give --grammar FILE to run it anyway")
        if not model.grammar.same_rules(grammar):
            raise InputError(f"{where} was trained on a different grammar than {data}'s; "
                             f"give --grammar FILE to run it anyway")


class ModelSampler:
    """Forward-backward with a diffusion model's reverse process (see the module docstring).

    model: anything with `.process` and `.denoiser()`. Runs the network on `device` (default: the
    process's); every random number comes from the generator the experiment passes in, so
    results do not depend on the device. Compatibility with the experiment is the caller's job
    (:func:`check_model`).
    """

    def __init__(self, model: DenoisingModel, grammar: Grammar, *, steps: int | None = None,
                 final_step: str | None = None, cache: bool | None = None,
                 device: torch.device | str | None = None) -> None:
        self.process = model.process
        if steps is not None:
            self.process.time_grid(steps)  # ConfigError for an impossible number of steps
        self.grammar = grammar
        self.steps = steps
        self.final_step = self.process.check_final_step(final_step)  # ConfigError if unknown
        self.cache = cache
        self.device = torch.device(device) if device is not None else self.process.device
        self.denoiser = model.denoiser()
        self._sampler = tokens_sampler(grammar, self.denoise_tokens)
        self._seen: set[float] = set()

    def info(self) -> dict:
        """The settings to record with the results."""
        return {"process": self.process.describe(), "steps": self.steps, "final_step": self.final_step}

    def denoise_tokens(self, x0: torch.Tensor, noise: float, generator: torch.Generator) -> torch.Tensor:
        """x̂0 [B, d] (long, on x0's device): x0 [B, d] corrupted at exactly `noise`, denoised."""
        if noise not in self._seen:
            self._seen.add(noise)
            start = self.process.time_for_corruption(noise)
            if start == 0 and noise > 0:
                log.warning("noise %g is closer to no corruption than to the model's first level; "
                            "x̂0 = x_t", noise)
            log.debug("noise %g: the model starts at time %s", noise, start)
        out = diffusion_forward_backward(self.process, self.denoiser, x0.to(self.device), noise,
                                         generator, steps=self.steps, batch_size=max(len(x0), 1),
                                         final_step=self.final_step, cache=self.cache,
                                         bar=silent_bar())
        return out.to(x0.device)

    def __call__(self, x0: torch.Tensor, noise: float, generator: torch.Generator,
                 clean: list[np.ndarray]) -> Denoised:
        return self._sampler(x0, noise, generator, clean)


def model_sampler(model: DenoisingModel, grammar: Grammar | None = None, *, steps: int | None = None,
                  final_step: str | None = None, cache: bool | None = None,
                  device: torch.device | str | None = None) -> ModelSampler:
    """A PosteriorSampler that denoises with `model` (default grammar: model.grammar)."""
    grammar = grammar if grammar is not None else model.grammar
    if grammar is None:
        raise InputError("the model carries no grammar; give one to parse its outputs")
    return ModelSampler(model, grammar, steps=steps, final_step=final_step, cache=cache, device=device)


@dataclass
class NoiseResult:
    """Forward-backward statistics at one noise level (definitions in the module docstring)."""

    noise: float
    process: str
    n: int  # number of (sentence, noise draw) pairs
    changed: list[float]  # l = 0..L
    root_kept: float
    grammatical: float  # fraction of denoised sentences that are grammatical
    changed_expected: list[float] | None = None
    root_kept_expected: float | None = None
    correlation_mode: str = "covariance"
    distance: list[int] = field(default_factory=list)
    correlation: list[float] = field(default_factory=list)
    susceptibility: float | None = None

    def to_json(self) -> dict:
        return asdict(self)


class _Accumulator:
    """Running sums for one noise level."""

    def __init__(self, grammar: Grammar, correlation: str) -> None:
        self.g = grammar
        self.n = 0
        self.changed = np.zeros(grammar.depth + 1)
        self.kept = np.zeros(grammar.depth + 1)
        self.has_kept = True
        self.grammatical = 0
        d = grammar.length
        self.corr = correlation != "none"
        self.s1 = np.zeros(d)
        self.s2 = np.zeros((d, d)) if self.corr else None

    def add(self, clean: list[np.ndarray], out: Denoised) -> None:
        b = clean[0].shape[0]
        self.n += b
        for level in range(self.g.depth + 1):
            self.changed[level] += (out.nodes[level] != clean[level]).mean(axis=1).sum()
        self.grammatical += int((out.nodes[self.g.depth][:, 0] >= 0).sum())
        if out.kept_probability is None:
            self.has_kept = False
        elif self.has_kept:
            for level in range(self.g.depth + 1):
                self.kept[level] += out.kept_probability[level].mean(axis=1).sum()
        c = torch.from_numpy((out.nodes[0] != clean[0]).astype(np.float64))  # [B, d] change indicators
        self.s1 += c.sum(0).numpy()
        if self.corr:
            self.s2 += (c.T @ c).numpy()  # torch: honours the caller's thread setting

    def result(self, noise: float, process: str, mode: str) -> NoiseResult:
        n = max(self.n, 1)
        changed = (self.changed / n).tolist()
        res = NoiseResult(noise=noise, process=process, n=self.n, changed=changed,
                          root_kept=1.0 - changed[-1], grammatical=self.grammatical / n,
                          correlation_mode=mode)
        if self.has_kept:
            res.changed_expected = (1.0 - self.kept / n).tolist()
            res.root_kept_expected = float(self.kept[-1] / n)
        if self.corr:
            dist, corr = change_correlation(self.s1 / n, self.s2 / n, pearson=mode == "pearson")
            res.distance = dist.tolist()
            res.correlation = corr.tolist()
            res.susceptibility = float(corr[1:].sum())
        return res


def change_correlation(mean: np.ndarray, second: np.ndarray, pearson: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """C(r), r = 0..d-1, from μ_i = <c_i> [d] and M_ij = <c_i c_j> [d, d] (see module docstring)."""
    d = mean.shape[0]
    cov = second - np.outer(mean, mean)  # [d, d]
    if pearson:
        sd = np.sqrt(np.clip(np.diag(cov), 0.0, None))
        denom = np.outer(sd, sd)
        cov = np.divide(cov, denom, out=np.zeros_like(cov), where=denom > 1e-300)
    corr = np.array([np.diagonal(cov, offset=r).mean() for r in range(d)])
    return np.arange(d), corr


def chunk_rows(grammar: Grammar) -> int:
    """Sentences per chunk: bounded memory for any depth, independent of user flags."""
    return max(16, 65536 // grammar.length)


def _generator(seed: int, noise: float, chunk: int) -> torch.Generator:
    # keyed by the noise *value*, so a level's draws do not depend on the rest of the sweep
    return torch_generator(seed, "forward-backward", int(round(noise * (1 << 32))), chunk)


def check_noises(noises: Iterable[float]) -> list[float]:
    out = [float(e) for e in noises]
    if not out:
        raise ConfigError("give at least one noise level")
    for e in out:
        if not (0.0 <= e <= 1.0) or math.isnan(e):
            raise ConfigError(f"noise levels must lie in [0, 1], got {e}")
    return out


def forward_backward(grammar: Grammar, batches: Iterable[np.ndarray], noises: Iterable[float],
                     process: CategoricalProcess, *, seed: int = 0, repeats: int = 1,
                     correlation: CorrelationMode = "covariance",
                     sampler: PosteriorSampler | None = None, total: int | None = None,
                     where: str = "input") -> list[NoiseResult]:
    """Run the experiment on clean sentences (token batches [B, d]) at every noise level.

    `process` is the noise process (its corruption at exactly E and, for BP, its leaf evidence).
    Each sentence is noised `repeats` times per level (independent draws). `sampler` defaults to
    exact BP. Returns one NoiseResult per noise level, in the given order. Raises InputError if
    a sentence is not grammatical (its latent tree is needed).
    """
    noises = check_noises(noises)
    if repeats < 1:
        raise ConfigError(f"--repeats must be >= 1, got {repeats}")
    if correlation not in CORRELATION_MODES:
        raise ConfigError(f"unknown correlation mode {correlation!r}; expected one of "
                          f"{', '.join(CORRELATION_MODES)}")
    if correlation != "none" and grammar.length > MAX_CORRELATION_LENGTH:
        raise ConfigError(f"change correlations need d <= {MAX_CORRELATION_LENGTH} (d = "
                          f"{grammar.length}); use --correlation none")
    sampler = sampler if sampler is not None else BPSampler(grammar, process)
    parser = Parser(grammar)
    accs = [_Accumulator(grammar, correlation) for _ in noises]
    rows = chunk_rows(grammar)
    chunk = 0
    offset = 0
    work = None if total is None else total * len(noises) * repeats
    with progress(work, "forward-backward") as bar:
        for tokens in _rechunk(batches, rows):
            clean = _clean_trees(parser, tokens, grammar, where, offset)
            clean_rep = [np.tile(c, (repeats, 1)) for c in clean]
            x0 = torch.from_numpy(clean_rep[0])
            for acc, noise in zip(accs, noises):
                gen = _generator(seed, noise, chunk)
                acc.add(clean_rep, sampler(x0, noise, gen, clean_rep))
                bar.advance(x0.shape[0])
            chunk += 1
            offset += tokens.shape[0]
    if offset == 0:
        raise InputError(f"{where}: no sentences")
    log.debug("forward-backward: %d sentences x %d draws at %d noise levels", offset, repeats, len(noises))
    return [acc.result(noise, process.name, correlation) for acc, noise in zip(accs, noises)]


def _clean_trees(parser: Parser, tokens: np.ndarray, grammar: Grammar, where: str,
                 offset: int) -> list[np.ndarray]:
    """Parse trees (nodes[l] [B, w_l], l = 0..L) of clean sentences; InputError if any is invalid."""
    if tokens.ndim != 2 or tokens.shape[1] != grammar.length:
        raise InputError(f"{where}: sequences have length {tokens.shape[-1]}, the grammar needs "
                         f"d = {grammar.length}")
    if tokens.size and (tokens.min() < 0 or tokens.max() >= grammar.vocab):
        raise InputError(f"{where}: tokens outside the vocabulary [0, {grammar.vocab})")
    parse = parser.parse(tokens)
    ok = parse.grammatical
    if not ok.all():
        row = offset + int(np.flatnonzero(~ok)[0])
        raise InputError(f"{where}: sentence {row} is not grammatical under this grammar; "
                         f"forward-backward needs clean sentences (their latent trees)")
    return parse.symbols


def _rechunk(batches: Iterable[np.ndarray], rows: int) -> Iterable[np.ndarray]:
    """Re-cut a stream of [B, d] batches into chunks of exactly `rows` rows (last one shorter)."""
    buf: list[np.ndarray] = []
    held = 0
    for batch in batches:
        batch = np.asarray(batch, dtype=np.int64)
        while batch.shape[0]:
            take = min(rows - held, batch.shape[0])
            buf.append(batch[:take])
            held += take
            batch = batch[take:]
            if held == rows:
                yield np.concatenate(buf)
                buf, held = [], 0
    if held:
        yield np.concatenate(buf)


def results_columns(results: list[NoiseResult], depth: int) -> dict[str, pa.Array]:
    """One row per noise level. List columns `changed`, `changed_expected` (levels 0..L),
    `distance`, `correlation`; scalar copies `changed_<l>` for plotting."""
    cols: dict[str, pa.Array] = {
        "noise": pa.array([r.noise for r in results], pa.float64()),
        "process": pa.array([r.process for r in results], pa.string()),
        "n": pa.array([r.n for r in results], pa.int64()),
        "changed": pa.array([r.changed for r in results], pa.list_(pa.float64())),
        "changed_expected": pa.array([r.changed_expected for r in results], pa.list_(pa.float64())),
        "root_kept": pa.array([r.root_kept for r in results], pa.float64()),
        "root_kept_expected": pa.array([r.root_kept_expected for r in results], pa.float64()),
        "grammatical": pa.array([r.grammatical for r in results], pa.float64()),
        "susceptibility": pa.array([r.susceptibility for r in results], pa.float64()),
        "distance": pa.array([r.distance for r in results], pa.list_(pa.int32())),
        "correlation": pa.array([r.correlation for r in results], pa.list_(pa.float64())),
    }
    for level in range(depth + 1):
        cols[f"changed_{level}"] = pa.array([r.changed[level] for r in results], pa.float64())
    return cols


def results_table_write(results: list[NoiseResult], grammar: Grammar, out: str, force: bool,
                        provenance: dict, tags: dict | None = None, **meta) -> None:
    """Write the results as a `forward-backward` results table (cgtools.formats.results)."""
    mode = results[0].correlation_mode if results else "none"
    table = results_table(results_columns(results, grammar.depth), kind=RESULTS_KIND, tags=tags,
                          provenance=provenance, grammar=grammar.to_json(), correlation=mode, **meta)
    write_results(table, out, force)
