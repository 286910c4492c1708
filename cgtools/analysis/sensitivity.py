"""Relative sensitivity of a network's internal representations to synonym exchanges (App. D.1).

For block k (pre-activations a_k) and level l (the exchange R_l of rhm-gen --perturb l: latents at
levels >= l kept, every production from level l down redrawn, i.e. all depth-(l-1) tuples replaced
by synonyms), eq. 26 of the paper:

    S_{k,l} = E_x ||a_k(x) - a_k(R_l x)||²  /  E_{x,y} ||a_k(x) - a_k(y)||²,

y an independent sentence, ||.|| the Euclidean norm over every position and channel of the block.
S = 0 for a block invariant to R_l, and S = 1 in expectation when R_l x is as unrelated to x as an
independent sentence.

Estimators (float64 sums, streaming over batches, nothing held per sentence):

* numerator: the mean over the N sentences of ||a(x_i) - a(R_l x_i)||²;
* denominator at noise E = 0: the U-statistic over all N(N-1)/2 pairs of distinct sentences,
  (1/(N(N-1))) Σ_{i≠j} ||a(x_i) - a(x_j)||² = 2/(N-1) Σ_i ||a(x_i) - ā||² (exactly; centred moments
  merged batch by batch), i.e. twice the total variance of a_k;
* at noise E > 0 every sentence gets one noise draw ξ_i, applied identically (same positions, same
  replacement tokens) to x_i, R_l x_i and a partner y_i = x_{i-1} (the previous sentence), so that
  both terms compare two inputs under the same noise: numerator the mean of
  ||a(x_i ⊕ ξ_i) - a(R_l x_i ⊕ ξ_i)||², denominator the mean over i >= 2 of
  ||a(x_i ⊕ ξ_i) - a(x_{i-1} ⊕ ξ_i)||².

Time (the paper is silent): by default (E = 0) the network sees the clean sentence at the lowest
noise level of its reverse process, process.time_grid()[-1] (uniform: level t = 1, network time
1/T; masked: 1/N), the time at which it denoises last. With E > 0 the inputs are corrupted at
exactly E and the network sees the process time whose corruption is closest to E (the same rule
as forward-backward), floored at that lowest level.

A network exposes its blocks with `block_names` (ordered from input to output) and
`forward(x_t, t, return_preactivations=True) -> (output, {name: [B, ...] tensor})`; the RHM U-Net
does (its pre-activations enc1..encL, dec1..decL, before the GeLU).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any, Iterable, Iterator, Mapping, Sequence

import numpy as np
import torch

from cgtools.errors import ConfigError, InputError, SchemaError
from cgtools.logs import progress
from cgtools.seeding import torch_generator

log = logging.getLogger(__name__)

RESULTS_KIND = "sensitivity"
#: Sentences per noise draw: fixed so that E > 0 results do not depend on --batch-size.
CHUNK_ROWS = 4096

Pairs = tuple[Any, Any] | Iterable[tuple[Any, Any]]  # (clean [N, d], perturbed [N, d]) or batches of them


@dataclass(frozen=True)
class SensitivityResult:
    """S_{k,l} for every block k (input -> output) and level l; lists indexed [block][level].

    numerator / denominator: the two means of eq. 26 (squared norms summed over the block's
    positions and channels); n[l]: sentences used at levels[l]; noise: the corruption E of the
    inputs; time: the network time τ in [0, 1] the network saw.
    """

    blocks: list[str]
    levels: list[int]
    sensitivity: list[list[float]]
    numerator: list[list[float]]
    denominator: list[list[float]]
    n: list[int]
    noise: float
    time: float

    def to_json(self) -> dict:
        return {"blocks": self.blocks, "levels": self.levels, "sensitivity": self.sensitivity,
                "n": self.n, "numerator": self.numerator, "denominator": self.denominator,
                "noise": self.noise, "time": self.time}

    def value(self, block: str, level: int) -> float:
        return self.sensitivity[self.blocks.index(block)][self.levels.index(level)]

    def columns(self) -> dict[str, list]:
        """One row per (block, level), blocks outer: the columns of the results table."""
        cols: dict[str, list] = {"block": [], "block_index": [], "level": [], "sensitivity": [], "n": [],
                                 "numerator": [], "denominator": [], "noise": []}
        for k, name in enumerate(self.blocks):
            for j, level in enumerate(self.levels):
                cols["block"].append(name)
                cols["block_index"].append(k)
                cols["level"].append(level)
                cols["sensitivity"].append(self.sensitivity[k][j])
                cols["n"].append(self.n[j])
                cols["numerator"].append(self.numerator[k][j])
                cols["denominator"].append(self.denominator[k][j])
                cols["noise"].append(self.noise)
        return cols


# ---- what a network must expose --------------------------------------------------------------------
def block_names(network) -> list[str]:
    """The network's block names, input -> output; ConfigError if it exposes none."""
    names = getattr(network, "block_names", None)
    if not names:
        raise ConfigError(f"the {type(network).__name__} network has no block representations "
                          f"(it needs block_names and forward(..., return_preactivations=True))")
    return list(names)


def block_representations(network, x_t: torch.Tensor, tau: torch.Tensor,
                          names: Sequence[str]) -> list[torch.Tensor]:
    """Pre-activations of blocks `names` for inputs x_t [B, d] at network times τ [B]:
    a list of [B, F_k] in the network's dtype (F_k = positions·channels of block k)."""
    _, pre = network(x_t, tau, return_preactivations=True)
    missing = [k for k in names if k not in pre]
    if missing:
        raise ConfigError(f"the {type(network).__name__} network did not return block(s) {', '.join(missing)}")
    return [pre[k].reshape(x_t.shape[0], -1) for k in names]


def sensitivity_time(process, noise: float):
    """The process time the network sees at corruption E (module docstring): the time whose
    corruption is closest to E, at least the lowest level of the reverse process."""
    lowest = process.time_grid()[-1]
    t = process.time_for_corruption(noise)
    return lowest if t < lowest else t


# ---- accumulators ----------------------------------------------------------------------------------
class _Moments:
    """Count, mean [F] and centred sum of squares Σ||a - ā||² of a stream of rows [B, F] (float64),
    merged batch by batch (Chan et al.)."""

    def __init__(self) -> None:
        self.n = 0
        self.mean: torch.Tensor | None = None
        self.m2 = 0.0

    def add(self, a: torch.Tensor) -> None:
        b = a.shape[0]
        mb = a.mean(dim=0)  # [F]
        m2b = float(((a - mb) ** 2).sum())
        if self.mean is None:
            self.n, self.mean, self.m2 = b, mb, m2b
            return
        n = self.n + b
        delta = mb - self.mean
        self.m2 += m2b + float((delta ** 2).sum()) * self.n * b / n
        self.mean = self.mean + delta * (b / n)
        self.n = n

    def pair_mean(self) -> float:
        """(1/(n(n-1))) Σ_{i≠j} ||a_i - a_j||² = 2 Σ||a_i - ā||² / (n - 1)."""
        return 2.0 * self.m2 / (self.n - 1) if self.n >= 2 else math.nan


class _Level:
    """Sums of one level for every block."""

    def __init__(self, blocks: int, noisy: bool) -> None:
        self.n = 0
        self.num = [0.0] * blocks
        self.noisy = noisy
        self.den = [0.0] * blocks  # noisy: sum over partner pairs
        self.den_n = 0
        self.moments = [_Moments() for _ in range(blocks)]  # clean: all-pairs statistic

    def result(self, k: int) -> tuple[float, float, float]:
        num = self.num[k] / self.n if self.n else math.nan
        if self.noisy:
            den = self.den[k] / self.den_n if self.den_n else math.nan
        else:
            den = self.moments[k].pair_mean()
        s = num / den if den > 0 else math.nan  # NaN also when the block never varies (0/0)
        return s, num, den


# ---- the measurement -------------------------------------------------------------------------------
def sensitivity(model, data: Mapping[int, Pairs], *, noise: float = 0.0, batch_size: int = 256,
                seed: int = 0, device: torch.device | str | None = None,
                total: int | None = None, where: Mapping[int, str] | None = None) -> SensitivityResult:
    """S_{k,l} of eq. 26 for every block of model.network and every level of `data`.

    model: anything with .network (exposing its blocks, see block_names) and .process (a token
    process: network_time, time_grid, time_for_corruption, corrupt). data: level l -> its
    sentences, (clean [N, d], perturbed [N, d] = R_l clean) as arrays/tensors, or an iterable of
    such batches (streamed). noise: corruption E in [0, 1] of the inputs (module docstring).
    batch_size: sentences per network call. seed: noise draws (E > 0 only). total: sentences over
    all levels, for the progress bar. where: level -> input name for error messages.
    Raises InputError for mismatched shapes or fewer than 2 sentences at a level.
    """
    if not 0.0 <= noise <= 1.0:
        raise ConfigError(f"--noise must lie in [0, 1], got {noise}")
    if batch_size < 1:
        raise ConfigError(f"--batch-size must be >= 1, got {batch_size}")
    if not data:
        raise InputError("no perturbed data given")
    network, process = model.network, model.process
    names = block_names(network)
    levels = sorted(data)
    for level in levels:
        if not isinstance(level, (int, np.integer)) or level < 1:
            raise ConfigError(f"perturbation levels must be integers >= 1, got {level!r}")
    if device is None:
        param = next(iter(network.parameters()), None) if hasattr(network, "parameters") else None
        device = param.device if param is not None else torch.device("cpu")
    t = sensitivity_time(process, noise)
    tau_one = process.network_time(process.full_time(t, 1, device))  # [1] float32
    noisy = noise > 0
    was_training = getattr(network, "training", False)
    if hasattr(network, "eval"):
        network.eval()
    results: dict[int, _Level] = {}
    try:
        with torch.inference_mode(), progress(total, "sensitivity") as bar:
            for level in levels:
                name = (where or {}).get(level, f"level {level}")
                results[level] = _measure_level(network, process, names, data[level], name, noisy, noise,
                                                tau_one, batch_size, seed, int(level), device, bar)
    finally:
        if was_training and hasattr(network, "train"):
            network.train()
    return _collect(names, levels, results, noise, float(tau_one[0]))


def _measure_level(network, process, names, pairs, name, noisy, noise, tau_one, batch_size, seed,
                   level, device, bar) -> _Level:
    """The sums of one level, streamed over chunks of CHUNK_ROWS sentences."""
    acc = _Level(len(names), noisy)
    prev = None  # the last clean sentence of the previous chunk [1, d] (partner of the next one)
    for chunk, (x, r) in enumerate(_chunks(pairs, CHUNK_ROWS, name)):
        x, r = x.to(device), r.to(device)  # [C, d] long
        if hasattr(process, "check_clean"):
            process.check_clean(x)
            process.check_clean(r)
        y = first = None
        if noisy:
            y = torch.cat([prev if prev is not None else x[:1], x[:-1]])  # y_i = x_{i-1}
            first = 0 if prev is not None else 1  # the very first sentence has no partner
            prev = x[-1:]
            gen = torch_generator(seed, "sensitivity", level, chunk)
            x, r, y = _same_noise(process, (x, r, y), noise, gen)
        for lo in range(0, x.shape[0], batch_size):
            xb, rb = x[lo:lo + batch_size], r[lo:lo + batch_size]  # [B, d]
            tau = tau_one.expand(xb.shape[0])  # [B]
            ax = block_representations(network, xb, tau, names)  # [B, F_k] each
            ar = block_representations(network, rb, tau, names)
            ay = block_representations(network, y[lo:lo + batch_size], tau, names) if noisy else None
            skip = max(first - lo, 0) if noisy else 0  # 1 only for the stream's first sentence
            for k in range(len(names)):
                a = ax[k].double()  # one block at a time in float64: [B, F_k]
                acc.num[k] += float(((a - ar[k].double()) ** 2).sum())
                if noisy:
                    acc.den[k] += float(((a[skip:] - ay[k][skip:].double()) ** 2).sum())
                else:
                    acc.moments[k].add(a)
            if noisy:
                acc.den_n += xb.shape[0] - skip
            acc.n += xb.shape[0]
            bar.advance(xb.shape[0])
    if acc.n < 2:
        raise InputError(f"{name}: the sensitivity needs at least 2 sentences, got {acc.n}")
    return acc


def _same_noise(process, inputs: Sequence[torch.Tensor], noise: float,
                gen: torch.Generator) -> list[torch.Tensor]:
    """Corrupt every [C, d] tensor of `inputs` with the same draws (same positions, same new
    tokens): the generator is rewound before each one. Processes draw their noise independently
    of the clean tokens, so row i of every output shares one noise realisation ξ_i."""
    state = gen.get_state()
    out = []
    for x in inputs:
        gen.set_state(state)
        out.append(process.corrupt(x, noise, gen))
    return out


def _chunks(pairs: Pairs, rows: int, name: str) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(clean, perturbed) long tensors [C, d], C = `rows` except the last chunk, from one pair of
    arrays or a stream of pairs; InputError for shapes that do not match."""
    if isinstance(pairs, tuple) and len(pairs) == 2 and not isinstance(pairs[0], tuple):
        pairs = [pairs]
    buf_x: list[torch.Tensor] = []
    buf_r: list[torch.Tensor] = []
    held = 0
    for x, r in pairs:
        x, r = _as_tokens(x), _as_tokens(r)
        if x.ndim != 2 or x.shape != r.shape:
            raise InputError(f"{name}: clean and perturbed sentences must both be [N, d], got "
                             f"{tuple(x.shape)} and {tuple(r.shape)}")
        while x.shape[0]:
            take = min(rows - held, x.shape[0])
            buf_x.append(x[:take])
            buf_r.append(r[:take])
            held += take
            x, r = x[take:], r[take:]
            if held == rows:
                yield torch.cat(buf_x), torch.cat(buf_r)
                buf_x, buf_r, held = [], [], 0
    if held:
        yield torch.cat(buf_x), torch.cat(buf_r)


def _as_tokens(a) -> torch.Tensor:
    """Token ids as a long tensor (a copy of numpy input: table batches are read-only)."""
    t = a if isinstance(a, torch.Tensor) else torch.tensor(np.asarray(a))
    return t if t.dtype == torch.long else t.long()


def _collect(names: list[str], levels: list[int], results: Mapping[int, _Level], noise: float,
             tau: float) -> SensitivityResult:
    s = [[0.0] * len(levels) for _ in names]
    num = [[0.0] * len(levels) for _ in names]
    den = [[0.0] * len(levels) for _ in names]
    for j, level in enumerate(levels):
        for k in range(len(names)):
            s[k][j], num[k][j], den[k][j] = results[level].result(k)
    n = [results[level].n for level in levels]
    log.debug("sensitivity: %d blocks x %d levels, n = %s", len(names), len(levels), n)
    return SensitivityResult(names, [int(v) for v in levels], s, num, den, n, float(noise), tau)


# ---- inputs: sequences tables with a perturbed column -----------------------------------------------
def perturbation_level(table, depth: int) -> int:
    """The level l of a sequences table written by `rhm-gen --perturb l` (its metadata), checked
    to lie in 1..depth and to come with a `perturbed` column; SchemaError / InputError otherwise."""
    from cgtools.formats.sequences import PERTURBED

    where = table.display()
    if PERTURBED not in table.columns:
        raise SchemaError(f"{where}: no '{PERTURBED}' column; write R_l x with `cgtools rhm-gen --perturb LEVEL`")
    info = table.meta.get("perturbation")
    level = info.get("level") if isinstance(info, dict) else None
    if not isinstance(level, int) or isinstance(level, bool):
        raise SchemaError(f"{where}: its metadata names no perturbation level "
                          f"(tables from `cgtools rhm-gen --perturb LEVEL` do)")
    if not 1 <= level <= depth:
        raise InputError(f"{where}: perturbation level {level} is outside 1..{depth} (the grammar's depth)")
    return level


def table_pairs(table, length: int, batch_size: int = 65536,
                num: int | None = None) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(tokens, perturbed) int64 batches [B, d] of a sequences table, the first `num` rows only."""
    from cgtools.formats.sequences import PERTURBED, TOKENS

    left = num
    clean = table.iter_column(TOKENS, batch_size=batch_size, length=length)
    pert = table.iter_column(PERTURBED, batch_size=batch_size, length=length)
    for x, r in zip(clean, pert):
        if left is not None:
            if left <= 0:
                return
            x, r = x[:left], r[:left]
            left -= x.shape[0]
        yield x, r


def results_table_write(result: SensitivityResult, out: str, force: bool, *, grammar: dict | None,
                        provenance: dict, tags: dict | None = None, **extra) -> None:
    """Write the results table (one row per block and level; kind "sensitivity")."""
    from cgtools.formats.results import results_table, write_results

    table = results_table(result.columns(), kind=RESULTS_KIND, tags=tags, provenance=provenance,
                          grammar=grammar, blocks=result.blocks, levels=result.levels,
                          noise=result.noise, time=result.time, **extra)
    write_results(table, out, force)
