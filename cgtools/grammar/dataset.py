"""`rhm-gen` as a library call: resolve the grammar, collect exclusions, stream sentences to Parquet."""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass, field

import numpy as np

from cgtools.errors import ConfigError, InputError
from cgtools.formats.files import InputFile, atomic_output, check_output
from cgtools.formats.sequences import SequencesTable, SequencesWriter, sequences_meta
from cgtools.grammar.parse import Parser
from cgtools.grammar.rhm import Grammar, draw_grammar
from cgtools.grammar.sampling import PerturbMode, generate_sentences
from cgtools.grammar.source import check_same_grammar, load_grammar, save_grammar
from cgtools.logs import progress

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GrammarSpec:
    """Grammar parameters given on the command line (None = not given)."""

    depth: int | None = None
    branching: int | None = None
    vocab: int | None = None
    synonyms: int | None = None
    n_classes: int | None = None

    def given(self) -> dict[str, int]:
        return {k: v for k, v in self.__dict__.items() if v is not None}


def resolve_grammar(spec: GrammarSpec, seed: int, source: InputFile | None) -> Grammar:
    """Load the grammar from `source`, or draw a new one from `spec` with `seed`."""
    if source is not None:
        g = load_grammar(source)
        for name, value in spec.given().items():
            if getattr(g, name) != value:
                raise ConfigError(f"--{name.replace('_', '-')} {value} contradicts the grammar in "
                                  f"{source.display()} ({name} = {getattr(g, name)})")
        return g
    missing = [k for k in ("depth", "branching", "vocab", "synonyms") if getattr(spec, k) is None]
    if missing:
        flags = ", ".join(f"--{k}" for k in missing)
        raise ConfigError(f"missing {flags} (or give --grammar FILE to reuse a grammar)")
    return draw_grammar(spec.depth, spec.branching, spec.vocab, spec.synonyms, spec.n_classes, seed)


def exclusion_keys(grammar: Grammar, sources: list[InputFile]) -> np.ndarray | None:
    """Derivation keys of every sentence in the `--exclude` tables (checked to be grammatical)."""
    if not sources:
        return None
    parser = Parser(grammar)
    keys = []
    for src in sources:
        table = SequencesTable(src)
        check_same_grammar(grammar, table, "was drawn from a different grammar; pass it with "
                                           "--grammar too so both use the same rules")
        for tokens in table.iter_column(length=grammar.length):
            if tokens.size and (tokens.min() < 0 or tokens.max() >= grammar.vocab):
                raise InputError(f"{src.display()}: tokens outside the vocabulary [0, {grammar.vocab})")
            parse = parser.parse(tokens)
            if not parse.grammatical.all():
                raise InputError(f"{src.display()}: holds sentences that are not grammatical under "
                                 f"this grammar; cannot exclude them")
            keys.append(parser.keys(parse))
    return np.concatenate(keys) if keys else None


@dataclass(frozen=True)
class GenerateConfig:
    num: int
    seed: int = 0
    latents: bool = False
    perturb_level: int | None = None
    perturb_mode: PerturbMode = "synonym"
    batch_size: int = 65536
    extra_meta: dict = field(default_factory=dict)


def write_dataset(grammar: Grammar, cfg: GenerateConfig, out: str, force: bool, provenance: dict,
                  exclude: np.ndarray | None = None, grammar_out: str | None = None) -> int:
    """Draw cfg.num distinct sentences and write the sequences table `out`. Returns the row count."""
    if cfg.num < 0:
        raise ConfigError(f"--num must be >= 0, got {cfg.num}")
    if cfg.perturb_level is not None and not 1 <= cfg.perturb_level <= grammar.depth:
        raise ConfigError(f"--perturb must be a level in 1..{grammar.depth}, got {cfg.perturb_level}")
    check_output(out, force)
    if grammar_out is not None:
        check_output(grammar_out, force)
    batches = generate_sentences(grammar, cfg.num, cfg.seed, exclude=exclude,
                                 batch_size=cfg.batch_size, latents=cfg.latents,
                                 perturb_level=cfg.perturb_level, perturb_mode=cfg.perturb_mode)
    extra = dict(cfg.extra_meta)
    if cfg.perturb_level is not None:
        extra["perturbation"] = {"level": cfg.perturb_level, "mode": cfg.perturb_mode}
    meta = sequences_meta(grammar.to_json(), provenance, **extra)
    widths = [grammar.width(level) for level in range(1, grammar.depth + 1)] if cfg.latents else None
    with atomic_output(out, force) as sink, progress(cfg.num, "rhm-gen") as bar:
        writer = SequencesWriter(sink, length=grammar.length, vocab=grammar.vocab, meta=meta,
                                 latent_widths=widths, n_classes=grammar.n_classes,
                                 perturbed=cfg.perturb_level is not None)
        # Write batch i on a second thread while batch i+1 is generated (pyarrow releases the GIL).
        with ThreadPoolExecutor(max_workers=1) as pool:
            pending = None
            try:
                for batch in batches:
                    if pending is not None:
                        pending.result()
                    pending = pool.submit(writer.write, batch.tokens, batch.latents, batch.perturbed)
                    bar.advance(len(batch.tokens))
                if pending is not None:
                    pending.result()
            finally:
                if pending is not None:
                    pending.cancel()
                    wait([pending])
                writer.close()
    if grammar_out is not None:
        save_grammar(grammar, grammar_out, force, provenance)
    log.debug("wrote %d sentences to %s", cfg.num, out)
    return cfg.num
