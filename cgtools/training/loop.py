"""The training loop: SGD/Adam with μP learning rates, validation, early stopping, checkpoints,
exact resume, and multi-process training under torchrun.

Everything random at step k (the batch, the noise levels, the noise) is drawn from generators
seeded by (seed, k), so a resumed run repeats exactly what the uninterrupted run would have done,
and every DDP process can rebuild the global batch and keep its own slice (the averaged gradient
then equals the single-process gradient of the whole batch).

RUN_DIR layout: model.safetensors (the best model by validation loss), last.safetensors (the
latest state, with optimizer state: what --resume reads), checkpoints/step_XXXXXXXX.safetensors
(log-spaced over training: in steps, hence in training tokens = step × batch × d, which each
checkpoint's metadata records as "tokens"), metrics.parquet (one row per validation).
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from cgtools.analysis.accuracy import measure_accuracy
from cgtools.diffusion import sample as diffusion_sample
from cgtools.errors import ConfigError, OutputError
from cgtools.grammar.rhm import Grammar
from cgtools.logs import progress
from cgtools.models.mup import param_groups
from cgtools.models.registry import check_fits
from cgtools.seeding import torch_generator
from cgtools.formats.checkpoint import Checkpoint, save_checkpoint
from cgtools.formats.files import InputFile
from cgtools.formats.metrics import read_metrics, write_metrics
from cgtools.training.config import TrainConfig
from cgtools.training.data import OfflineData, OnlineData, as_examples, rank_slice
from cgtools.training.presets import RunConfig
from cgtools.training.trained import DiffusionModel, build_model

log = logging.getLogger(__name__)


@dataclass
class TrainResult:
    steps_done: int
    best_step: int | None
    best_val_loss: float | None
    stopped_early: bool
    metrics: list[dict]


@dataclass(frozen=True)
class Distributed:
    """This process's place in a torchrun job (rank 0 of 1 when run alone)."""

    rank: int = 0
    world: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed(device: str) -> Distributed:
    """Join the torchrun process group if WORLD_SIZE > 1 (gloo on CPU, NCCL on CUDA)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Distributed()
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    return Distributed(dist.get_rank(), dist.get_world_size())


def log_spaced_steps(total: int, per_decade: int) -> set[int]:
    """Steps (1-based counts) at which to keep a checkpoint: ~per_decade per factor of 10, plus the end."""
    out = {total}
    k = 0
    while True:
        step = int(round(10 ** (k / per_decade)))
        if step > total:
            return out
        out.add(step)
        k += 1


def early_eval_steps(eval_every: int, per_decade: int) -> set[int]:
    """The log-spaced validation steps below the first regular one (--early-evals; empty when 0)."""
    if per_decade == 0:
        return set()
    return {s for s in log_spaced_steps(eval_every, per_decade) if s < eval_every}


def make_optimizer(groups: list[dict], cfg: TrainConfig) -> torch.optim.Optimizer:
    """The run's optimiser over param_groups `groups` (fused SGD with momentum, or fused Adam)."""
    # torch picks the per-parameter loop on CPU unless told; the fused kernels update every
    # tensor in one pass (Adam: 5.9 -> ~1 ms per step at width 256 on this machine).
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum,
                               weight_decay=cfg.weight_decay, fused=True)
    return torch.optim.Adam(groups, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True)


def run_meta(run: RunConfig, grammar: Grammar | None, provenance: dict, data_meta: dict | None = None) -> dict:
    """The metadata every checkpoint of a run carries (configs, grammar, provenance, and the
    training table's keys that samples need downstream: "tokenizer", "vocab"; see
    cgtools.training.source.carried_meta)."""
    return {"arch": run.arch, "model": json.loads(run.model.to_json()),
            "process": json.loads(run.process.to_json()), "train": run.train.to_dict(),
            "grammar": None if grammar is None else grammar.to_json(), "provenance": provenance,
            **(data_meta or {})}


class Trainer:
    """One training run. Build it, then call :meth:`run`.

    A caller that makes the optimiser steps itself (cgtools.training.sweep) keeps `step`, the
    network and the optimiser state current and calls :meth:`after_step` after each step.
    """

    def __init__(self, model: DiffusionModel, cfg: TrainConfig, run_dir: Path, *,
                 train_tokens: np.ndarray | None, val_tokens: np.ndarray, grammar: Grammar | None,
                 meta: dict, device: str = "cpu", dist: Distributed = Distributed(),
                 label: str = "") -> None:
        self.model, self.cfg, self.run_dir = model, cfg, Path(run_dir)
        self.grammar, self.meta, self.device, self.dist = grammar, meta, device, dist
        self.label = f"{label}: " if label else ""  # prefix of log lines (sweeps name their runs)
        if cfg.batch_size % dist.world:
            raise ConfigError(f"batch size {cfg.batch_size} does not divide among {dist.world} processes")
        if dist.world > 1 and model.process.config.adapts_to_losses:
            # each rank sees the losses of its own slice only: their time samplers would drift apart
            raise ConfigError("--importance-sampling learns from every loss of a step, which one DDP process "
                              "does not see; train such a run in a single process")
        if cfg.online:
            if grammar is None:
                raise ConfigError("--online needs a grammar to draw fresh sentences from")
            self.data = OnlineData(grammar, cfg.batch_size, cfg.seed, exclude=val_tokens)
        else:
            if train_tokens is None or not len(train_tokens):
                raise ConfigError("no training sentences")
            self.data = OfflineData(train_tokens, cfg.batch_size, cfg.seed)
        self.train_tokens = train_tokens
        self.val = as_examples(val_tokens).to(device)
        net = model.network
        self.groups = param_groups(net, cfg.lr, cfg.optimizer, scheme=cfg.lr_scheme)
        for g in self.groups:
            g["base_lr"] = g["lr"]
        self.optimizer = make_optimizer(self.groups, cfg)
        self.ddp = None
        if dist.world > 1:
            from torch.nn.parallel import DistributedDataParallel

            self.ddp = DistributedDataParallel(net, device_ids=[device] if device.startswith("cuda") else None)
        self.ema = {k: v.detach().clone() for k, v in net.state_dict().items()} if cfg.ema else None
        self.step = 0
        self.best_val: float | None = None
        self.best_step: int | None = None
        self.bad_evals = 0
        self.rows: list[dict] = []
        self.keep = log_spaced_steps(cfg.steps, cfg.checkpoints_per_decade)
        self.early = early_eval_steps(cfg.eval_every, cfg.early_evals)
        self.elapsed = 0.0
        self.window: list[float] = []  # training losses since the last validation

    # ---- state ---------------------------------------------------------------------------------
    def tokens_seen(self, step: int | None = None) -> int | None:
        """Training tokens (step × batch × length, all processes) after `step` (default: now);
        None when the network has no fixed length."""
        length = self.model.length
        return None if length is None else (self.step if step is None else step) * self.cfg.batch_size * length

    def _meta(self, **extra) -> dict:
        return {**self.meta, "step": self.step, "tokens": self.tokens_seen(), "best_val_loss": self.best_val,
                "best_step": self.best_step, "bad_evals": self.bad_evals,
                "seconds": self.elapsed, **extra}

    def _weights(self) -> dict[str, torch.Tensor]:
        return self.ema if self.ema is not None else self.model.network.state_dict()

    def resume(self) -> None:
        """Load RUN_DIR/last.safetensors; the run continues exactly where it stopped."""
        path = self.run_dir / "last.safetensors"
        if not path.exists():
            raise ConfigError(f"{self.run_dir}: nothing to resume (no last.safetensors)")
        ckpt = Checkpoint(InputFile(str(path), None))
        for key in ("arch", "model", "process", "grammar"):
            if ckpt.meta.get(key) != self.meta.get(key):
                raise ConfigError(f"{self.run_dir} was trained with a different {key} config"
                                  f"{_differences(ckpt.meta.get(key), self.meta.get(key))}; "
                                  f"start a new run directory or repeat the original flags")
        old, new = _trajectory(ckpt.meta.get("train", {})), _trajectory(self.meta["train"])
        if old != new:
            raise ConfigError(f"{self.run_dir} was trained with different training settings"
                              f"{_differences(old, new)}; only --steps (with a constant lr), "
                              f"--patience and evaluation settings may change")
        self.model.network.load_state_dict(ckpt.model)
        state = ckpt.optimizer_state()
        if state is not None:
            self.optimizer.load_state_dict(state)
        if self.ema is not None and ckpt.ema is not None:
            self.ema = {k: v.to(self.device) for k, v in ckpt.ema.items()}
        if ckpt.process_state:
            self.model.process.load_state_dict({k: v.to(self.device) for k, v in ckpt.process_state.items()})
        m = ckpt.meta
        self.step, self.best_val, self.best_step = m["step"], m.get("best_val_loss"), m.get("best_step")
        self.bad_evals, self.elapsed = m.get("bad_evals", 0), m.get("seconds", 0.0)
        self.window = list(m.get("loss_window", []))
        self.rows = [r for r in read_metrics(self.run_dir / "metrics.parquet") if r["step"] <= self.step]
        log.info("%sresumed %s at step %d", self.label, self.run_dir, self.step)

    def _save_last(self) -> None:
        if self.dist.main:
            save_checkpoint(self.run_dir / "last.safetensors", self.model.network.state_dict(),
                            self._meta(loss_window=self.window), optimizer=self.optimizer.state_dict(),
                            ema=self.ema, process_state=self.model.process.state_dict())

    # ---- one step --------------------------------------------------------------------------------
    def _train_step(self) -> float:
        cfg, proc, dist = self.cfg, self.model.process, self.dist
        x0 = self.data.batch(self.step).to(self.device)  # [B, d] global batch
        gen = torch_generator(cfg.seed, "noise", self.step)
        t = proc.sample_t(cfg.batch_size, gen)
        x_t = proc.q_sample(x0, t, gen)
        x0, x_t, t = (rank_slice(v, dist.rank, dist.world) for v in (x0, x_t, t))
        factor = cfg.lr_factor(self.step)
        for g in self.optimizer.param_groups:
            g["lr"] = g["base_lr"] * factor
        net = self.ddp if self.ddp is not None else self.model.network
        autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if self.device.startswith("cuda")
                    else nullcontext())
        with autocast:
            logits = net(x_t, proc.network_time(t))
        terms = proc.loss(logits.float(), x0, x_t, t)
        loss = terms.loss.mean()
        if not torch.isfinite(loss):
            raise ConfigError(f"training diverged at step {self.step} (loss {loss.item()}); "
                              f"lower --lr")
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip is not None:  # DDP has averaged the gradients already: every rank clips alike
            torch.nn.utils.clip_grad_norm_(self.model.network.parameters(), cfg.grad_clip)
        self.optimizer.step()
        proc.observe_losses(t, terms)  # e.g. importance sampling of t (a no-op for most processes)
        if self.ema is not None:
            with torch.no_grad():
                for k, v in self.model.network.state_dict().items():
                    self.ema[k].lerp_(v, 1 - cfg.ema) if v.is_floating_point() else self.ema[k].copy_(v)
        self.step += 1
        return float(loss.detach())

    # ---- validation ------------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self) -> dict:
        """Validation loss / ELBO (fixed noise draws, same at every validation) and a sample check."""
        net = self.model.network
        backup = None
        if self.ema is not None:
            backup = {k: v.clone() for k, v in net.state_dict().items()}
            net.load_state_dict(self.ema)
        net.eval()
        try:
            return self._evaluate()
        finally:  # the raw weights go back even when validation fails (e.g. Ctrl-C)
            if backup is not None:
                net.load_state_dict(backup)
            net.train()

    def _evaluate(self) -> dict:
        cfg, proc = self.cfg, self.model.process
        gen = torch_generator(cfg.seed, "validation", device="cpu")
        losses, elbos = [], []
        for _ in range(cfg.val_repeats):
            for lo in range(0, len(self.val), 1024):
                x0 = self.val[lo:lo + 1024]
                t = proc.sample_t(len(x0), gen)
                x_t = proc.q_sample(x0, t, gen)
                terms = proc.loss(self.model.logits(x_t, t).float(), x0, x_t, t)
                losses.append(terms.loss)
                elbos.append(terms.elbo_bits)
        row = {"val_loss": float(torch.cat(losses).mean()), "val_elbo_bits": float(torch.cat(elbos).mean())}
        if cfg.sample_check and self.grammar is not None:
            gen = torch_generator(cfg.seed, "sample-check", device="cpu")
            samples = diffusion_sample(proc, self.model.denoiser(), cfg.sample_check, self.model.length,
                                       gen, steps=cfg.sample_steps, device=self.device,
                                       description="sample check")
            report = measure_accuracy([samples.cpu().numpy()], self.grammar,
                                      train=None if cfg.online else self.train_tokens)
            row["sample_accuracy"] = report.accuracy
            row["sample_memorized"] = report.memorized
            row["sample_novel_valid"] = report.novel_valid
        return row

    # ---- after each step -------------------------------------------------------------------------
    def eval_due(self) -> bool:
        """Whether the step just made (self.step) is followed by a validation."""
        return self.step % self.cfg.eval_every == 0 or self.step == self.cfg.steps or self.step in self.early

    def after_step(self, loss: float) -> tuple[dict | None, bool]:
        """Record the training loss of the step that made self.step, keep its log-spaced checkpoint
        and, when due, validate (metrics row, best model, last.safetensors).

        Returns (the metrics row or None, whether early stopping ends the run here).
        """
        cfg = self.cfg
        self.window.append(loss)
        if self.step in self.keep and self.dist.main:
            save_checkpoint(self.run_dir / "checkpoints" / f"step_{self.step:08d}.safetensors",
                            self._weights(), self._meta())
        if not self.eval_due():
            return None, False
        row = {"step": self.step, "examples": self.step * cfg.batch_size, "tokens": self.tokens_seen(),
               "train_loss": float(np.mean(self.window)), "lr": cfg.lr * cfg.lr_factor(self.step - 1),
               "seconds": self.elapsed, **self.evaluate()}
        self.window = []
        self.rows.append(row)
        log.info("%sstep %d  train %.4f  val %.4f  elbo %.3f bits/%s%s", self.label, self.step,
                 row["train_loss"], row["val_loss"], row["val_elbo_bits"],
                 "dim" if self.meta.get("images") else "token",
                 "" if "sample_accuracy" not in row else
                 f"  grammatical {row['sample_accuracy'][-1]:.3f}")
        if self.best_val is None or row["val_loss"] < self.best_val:
            self.best_val, self.best_step, self.bad_evals = row["val_loss"], self.step, 0
            if self.dist.main:
                save_checkpoint(self.run_dir / "model.safetensors", self._weights(), self._meta())
        else:
            self.bad_evals += 1
        if self.dist.main:
            write_metrics(self.run_dir / "metrics.parquet", self.rows, self.meta.get("provenance", {}))
        self._save_last()
        stop = cfg.patience is not None and self.bad_evals >= cfg.patience
        if stop:
            log.info("%searly stopping at step %d (best %d)", self.label, self.step, self.best_step)
        return row, stop

    # ---- the run ---------------------------------------------------------------------------------
    def run(self, stop_after: int | None = None, interrupt: threading.Event | None = None) -> TrainResult:
        """Train until cfg.steps, early stopping, or `stop_after` steps in this call (tests).

        interrupt: set by another thread (a sweep's Ctrl-C), it stops the run between two steps as
        Ctrl-C does (last.safetensors saved, KeyboardInterrupt raised).
        """
        cfg = self.cfg
        (self.run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
        self.model.network.train()
        stopped_early = False
        start_step, t0 = self.step, time.perf_counter() - self.elapsed
        with progress(cfg.steps, "train") as bar:
            bar.advance(self.step)
            try:
                while self.step < cfg.steps:
                    if stop_after is not None and self.step - start_step >= stop_after:
                        break
                    if interrupt is not None and interrupt.is_set():
                        raise KeyboardInterrupt
                    loss = self._train_step()
                    bar.advance()
                    self.elapsed = time.perf_counter() - t0
                    row, stop = self.after_step(loss)
                    if row is not None:
                        bar.update(loss=row["train_loss"], val=row["val_loss"])
                    if stop:
                        stopped_early = True
                        break
            except KeyboardInterrupt:
                self._save_last()  # resume from here with --resume
                raise
        if stop_after is not None:
            self._save_last()
        return TrainResult(self.step, self.best_step, self.best_val, stopped_early, self.rows)


RUN_OUTPUTS = ("model.safetensors", "last.safetensors", "metrics.parquet")


def _run_contents(run_dir: Path) -> tuple[list[Path], list[Path]]:
    """(checkpoints, foreign files) in a run directory: what a new run would destroy.

    Checkpoints are model/last/step_* safetensors; foreign files are anything cgtools did not
    write there (a user's notes, other data). metrics.parquet, an empty checkpoints/ and hidden
    temporaries are neither: a run that died before its first checkpoint leaves only those.
    """
    checkpoints, foreign = [], []
    if not run_dir.exists():
        return checkpoints, foreign
    for p in run_dir.iterdir():
        if p.name in ("model.safetensors", "last.safetensors"):
            checkpoints.append(p)
        elif p.name == "checkpoints" and p.is_dir():
            for q in p.iterdir():
                if q.name.startswith("step_") and q.suffix == ".safetensors":
                    checkpoints.append(q)
                elif not q.name.startswith("."):
                    foreign.append(q)
        elif p.name == "metrics.parquet" or p.name.startswith("."):
            continue
        else:
            foreign.append(p)
    return checkpoints, foreign


def prepare_run_dir(run_dir: Path, resume: bool, force: bool) -> bool:
    """Make RUN_DIR ready; True when there is a run to resume (RUN_DIR/last.safetensors).

    Never destroys a run or a user's file without --force: a directory holding checkpoints needs
    --resume (continue) or --force (start over); one holding files cgtools did not write needs
    --force. A directory with no checkpoint yet (a run that died early, e.g. on a full disk)
    counts as empty, with or without --resume.
    """
    if resume and (run_dir / "last.safetensors").exists():
        return True
    checkpoints, foreign = _run_contents(run_dir)
    if not force:
        if foreign:
            raise OutputError(f"{run_dir} is not empty (it holds {foreign[0].name}, not written by cgtools train); "
                              f"use another run directory or --force to overwrite it")
        if checkpoints:
            hint = ("it has checkpoints but no last.safetensors to resume from" if resume
                    else "it holds a run; use --resume to continue it")
            raise OutputError(f"{run_dir} is not empty: {hint}, or --force to overwrite it")
    if resume:
        log.info("%s: nothing to resume yet; starting the run", run_dir)
    for name in RUN_OUTPUTS:
        (run_dir / name).unlink(missing_ok=True)
    for p in checkpoints:
        p.unlink(missing_ok=True)
    run_dir.mkdir(parents=True, exist_ok=True)
    return False


def train(run: RunConfig, run_dir: str | Path, *, train_tokens: np.ndarray | None,
          val_tokens: np.ndarray, grammar: Grammar | None, provenance: dict, device: str = "cpu",
          resume: bool = False, force: bool = False, stop_after: int | None = None,
          data_meta: dict | None = None) -> TrainResult:
    """Train a diffusion model and write RUN_DIR (see the module docstring). data_meta: the
    training table's keys every checkpoint carries (TrainingData.meta)."""
    cfg = run.train
    run_dir = Path(run_dir)
    dist = init_distributed(device)
    if dist.world > 1 and device.startswith("cuda"):
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', dist.rank))}"
    check_fits(run.arch, run.model, cfg.batch_size // dist.world, device)  # before any file is written
    resuming = prepare_run_dir(run_dir, resume, force) if dist.main else resume
    if dist.world > 1:
        import torch.distributed as tdist

        flag = torch.tensor([int(resuming)])
        tdist.broadcast(flag, 0)  # every rank resumes, or none does
        resuming = bool(flag.item())
    meta = run_meta(run, grammar, provenance, data_meta)
    model = build_model(run.arch, run.model, run.process, seed=cfg.seed, device=device, grammar=grammar,
                        meta=meta)
    trainer = Trainer(model, cfg, run_dir, train_tokens=train_tokens, val_tokens=val_tokens,
                      grammar=grammar, meta=meta, device=device, dist=dist)
    if resuming:
        trainer.resume()
    result = trainer.run(stop_after=stop_after)
    if dist.world > 1:
        import torch.distributed as tdist

        tdist.barrier()
    return result


def _trajectory(train: dict) -> dict:
    """The training settings that change what the weights become (resume must keep them)."""
    free = {"patience", "eval_every", "early_evals", "sample_check", "sample_steps", "checkpoints_per_decade",
            "val_repeats"}
    if train.get("lr_schedule", "constant") == "constant":
        free.add("steps")
    return {k: v for k, v in train.items() if k not in free}


def _differences(old, new) -> str:
    """' (KEY: OLD -> NEW; ...)' listing every differing key of two settings dicts ('' if none)."""
    if not isinstance(old, dict) or not isinstance(new, dict):
        return ""
    parts = []
    for key in sorted(set(old) | set(new), key=str):
        a, b = old.get(key), new.get(key)
        if a != b:
            if isinstance(a, (dict, list)) or isinstance(b, (dict, list)):
                parts.append(f"{key} differs")
            else:
                parts.append(f"{key}: {a!r} -> {b!r}")
    return f" ({'; '.join(parts)})" if parts else ""
