"""A sweep: many training runs in one process, members of one shape trained as one stacked network.

Members whose runs differ only in the data (training and validation tables, even grammars of the
same shape), the seed and the per-run evaluation settings (patience, --eval-every, sample checks)
share a *stack key* (`stack_key`): their weights are stacked along a new leading axis K and one
step of the stack is one vmapped forward/backward (torch.func.functional_call over the architecture's
own forward, so every config of every registered architecture stacks) and one fused optimiser
step over [K, ...] tensors. Members differ in everything random: member i draws, at step k,
exactly the batch, noise levels and noise a single run with its seed draws (its own OfflineData /
OnlineData and torch_generator(seed_i, "noise", k)), from weights initialised from seed_i; the
stacked losses are summed, and since no operation mixes members, each slice receives its own
member's gradient (and --grad-clip clips each member's own gradient norm: clip_stacked_grad_norm_).
Results match single runs up to float rounding (batched GEMMs round
differently from single ones), not bit for bit.

Each member keeps a `Trainer` (cgtools.training.loop) for everything but the step: its slice is
copied into the Trainer's network (and optimiser state) before the Trainer writes a checkpoint or
validates, so a member's run directory holds exactly the files `cgtools train` writes, in the same
format (load_model, sample, and a later `cgtools train --resume` read them). A member that stops
early, diverges or ends its steps leaves the stack (the stack is rebuilt from the remaining
Trainers); the others go on unchanged. A member that shares its key with no other trains alone
through `Trainer.run` (bit-identical to `cgtools train`). Resume works per member: members resumed
at the same step stack again.

Stacks train one after another, or `jobs` of them side by side in worker threads, each running its
tensor operations on its own intra-op thread(s): on a 2-core machine two single-threaded stacks
beat one stack on two OpenMP threads, whose synchronisation stalls when other jobs share the
cores (bench/sweep.py). Every member's model is built before the first step, so a sweep holds
all of them in memory (meant for many small models).

The "seconds" column and metadata of a stacked member is the wall time of its stack (shared by
its K members), not a single run's time.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import threading
import time
import warnings
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch.func import functional_call, vmap

from cgtools.errors import ConfigError
from cgtools.grammar.rhm import Grammar
from cgtools.logs import progress
from cgtools.seeding import torch_generator
from cgtools.training.loop import (TrainResult, Trainer, _trajectory, make_optimizer,
                                   prepare_run_dir, run_meta)
from cgtools.training.presets import RunConfig
from cgtools.training.trained import build_model

log = logging.getLogger(__name__)

#: Members per stacked network unless told otherwise: at width 256 the CPU time per model-step
#: falls from K = 1 to 4 and is flat from 4 to 16 (per-element work grows with K), so larger stacks
#: only cost memory.
DEFAULT_MAX_STACK = 8

# vmap runs ops without a batching rule (the CPU flash-attention kernel behind the transformer's
# scaled_dot_product_attention) member by member, correctly, and warns about it at every call.
_FALLBACK_WARNING = "There is a performance drop because we have not yet implemented the batching rule"


@dataclass
class SweepMember:
    """One run of a sweep: what `cgtools.training.loop.train` takes, and a label for logs."""

    run: RunConfig
    run_dir: Path
    train_tokens: np.ndarray | None  # [P, d] (None or ignored with --online)
    val_tokens: np.ndarray  # [N, d]
    grammar: Grammar | None
    provenance: dict = field(default_factory=dict)
    label: str = ""  # default: the run directory
    data_meta: dict = field(default_factory=dict)  # the training table's carried keys (TrainingData.meta)

    def __post_init__(self) -> None:
        self.run_dir = Path(self.run_dir)
        self.label = self.label or str(self.run_dir)


def stack_key(run: RunConfig) -> str:
    """Runs with equal keys can share a stacked network: the same architecture, model and process
    configs and the same training trajectory settings except the seed (steps may differ only
    under a constant learning rate; patience and evaluation settings may always differ)."""
    train = _trajectory(run.train.to_dict())
    train.pop("seed")
    return json.dumps({"arch": run.arch, "model": json.loads(run.model.to_json()),
                       "process": json.loads(run.process.to_json()), "train": train}, sort_keys=True)


def plan_stacks(runs: Sequence[RunConfig], max_stack: int | None = DEFAULT_MAX_STACK,
                start_steps: Sequence[int] | None = None, jobs: int = 1) -> list[list[int]]:
    """Member indices grouped into stacks, largest first.

    A stack holds runs of one stack key that start at the same step (resumed runs), at most
    `max_stack` of them (None: no limit; a group is cut into near-equal parts). While there are
    fewer stacks than `jobs` (stacks trained side by side), the largest one is halved.
    """
    if max_stack is not None and max_stack < 1:
        raise ConfigError(f"the stack size must be >= 1, got {max_stack}")
    if jobs < 1:
        raise ConfigError(f"jobs must be >= 1, got {jobs}")
    steps = list(start_steps) if start_steps is not None else [0] * len(runs)
    groups: dict[tuple[str, int], list[int]] = {}
    for i, run in enumerate(runs):
        groups.setdefault((stack_key(run), steps[i]), []).append(i)
    stacks = []
    for g in groups.values():
        parts = -(-len(g) // max_stack) if max_stack else 1
        stacks += [g[j::parts] for j in range(parts)]
    while len(stacks) < jobs and max(map(len, stacks), default=0) > 1:
        big = max(stacks, key=len)
        stacks.remove(big)
        stacks += [big[0::2], big[1::2]]
    return sorted((sorted(st) for st in stacks), key=lambda st: (-len(st), st[0]))


def train_sweep(members: Sequence[SweepMember], *, device: str = "cpu", resume: bool = False,
                force: bool = False, max_stack: int | None = DEFAULT_MAX_STACK, jobs: int = 1,
                threads: int | None = None, stop_after: int | None = None) -> list[TrainResult]:
    """Train every member into its run directory; results in member order.

    jobs: stacks trained side by side, each in its own thread running its tensor operations on
    `threads` intra-op threads (default: torch's count divided by jobs). jobs = 1 trains the
    stacks one after another in this thread (torch's thread count unchanged). Every run directory
    is checked (and, with force, cleared) and every model built before the first step. A member
    that diverges does not stop the others: the sweep ends with a ConfigError naming it once
    every other member is done.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ConfigError("a sweep trains its members in one process; start it without torchrun")
    if not members:
        raise ConfigError("the sweep has no members")
    dirs: dict[Path, int] = {}
    for i, m in enumerate(members):
        key = m.run_dir.resolve()
        if key in dirs:
            raise ConfigError(f"members {dirs[key] + 1} and {i + 1} both write {m.run_dir}")
        dirs[key] = i
    resuming = [prepare_run_dir(m.run_dir, resume, force) for m in members]
    trainers = [_trainer(m, device, r) for m, r in zip(members, resuming)]
    results: list[TrainResult | None] = [None] * len(members)
    failures: list[str] = []
    done = [i for i, tr in enumerate(trainers) if tr.step >= tr.cfg.steps]
    for i in done:  # a finished run resumed: nothing to train (Trainer.run returns at once)
        results[i] = trainers[i].run(stop_after=stop_after)
    todo = [i for i in range(len(members)) if i not in done]
    stacks = [[todo[j] for j in st] for st in
              plan_stacks([members[i].run for i in todo], max_stack, [trainers[i].step for i in todo], jobs)]
    if stacks:
        log.info("sweep: %d runs in %d stack(s) of %s%s", len(todo), len(stacks),
                 ", ".join(str(len(st)) for st in stacks), f", {jobs} side by side" if jobs > 1 else "")

    def train_stack(ids: list[int], interrupt: threading.Event | None = None) -> None:
        if len(ids) == 1:  # alone: exactly `cgtools train`
            try:
                results[ids[0]] = trainers[ids[0]].run(stop_after=stop_after, interrupt=interrupt)
            except ConfigError as exc:
                failures.append(f"{members[ids[0]].label}: {exc}")
            return
        out, errors = StackedRun([trainers[i] for i in ids]).run(stop_after=stop_after, interrupt=interrupt)
        for i, res, err in zip(ids, out, errors):
            results[i] = res
            if err:
                failures.append(f"{members[i].label}: {err}")

    if jobs == 1 or len(stacks) <= 1:
        for ids in stacks:
            train_stack(ids)
    else:
        per_job = threads or max(1, torch.get_num_threads() // jobs)
        _side_by_side(stacks, train_stack, jobs, per_job)
    if failures:
        more = f" (and {len(failures) - 1} more)" if len(failures) > 1 else ""
        raise ConfigError(f"{failures[0]}{more}; the other runs of the sweep finished")
    return results  # type: ignore[return-value]


def _side_by_side(stacks: list[list[int]], train_stack, jobs: int, threads: int) -> None:
    """Run train_stack on every stack, `jobs` at a time in worker threads (tensor operations
    release the GIL) with `threads` intra-op threads each. Ctrl-C (seen by this thread) stops
    every worker between two steps, and each saves its runs' last.safetensors as a single run
    would; a second Ctrl-C stops waiting for them."""
    todo = queue.SimpleQueue()
    for ids in stacks:  # largest first
        todo.put(ids)
    errors: list[BaseException] = []
    before = torch.get_num_threads()
    interrupt = threading.Event()

    def work() -> None:
        torch.set_num_threads(threads)  # OpenMP's thread count is per calling thread
        while True:
            try:
                ids = todo.get_nowait()
            except queue.Empty:
                return
            if interrupt.is_set():
                return
            try:
                train_stack(ids, interrupt)
            except BaseException as exc:  # noqa: BLE001 - re-raised in the calling thread
                errors.append(exc)
                interrupt.set()  # the others save their runs and stop too
                return

    workers = [threading.Thread(target=work, name=f"sweep-{j}", daemon=True)
               for j in range(min(jobs, len(stacks)))]
    for w in workers:
        w.start()
    try:
        while any(w.is_alive() for w in workers):
            for w in workers:
                w.join(timeout=0.2)
    except KeyboardInterrupt:
        interrupt.set()  # each worker saves its runs and ends after its current step
        while any(w.is_alive() for w in workers):
            for w in workers:
                w.join(timeout=0.2)
        raise
    finally:
        torch.set_num_threads(before)
    if errors:
        raise next((e for e in errors if not isinstance(e, KeyboardInterrupt)), errors[0])


def member_from_files(data: str | Path, val: str | Path, run_dir: str | Path, *, preset: str,
                      process: str | None, arch: str | None, settings: dict[str, Any], allow_overlap: bool = False,
                      label: str = "") -> SweepMember:
    """A member from its tables, as `cgtools train DATA --val VAL -o RUN_DIR` with `settings` reads
    them (the same checks: grammar, vocabulary, overlap), with "cgtools sweep" provenance."""
    from cgtools.formats.files import open_input
    from cgtools.formats.metadata import provenance
    from cgtools.training.presets import resolve_run
    from cgtools.training.source import load_training_data

    sources = [open_input(data), open_input(val)]
    data_set = load_training_data(*sources, online=bool(settings.get("online")), allow_overlap=allow_overlap)
    run = resolve_run(preset, process=process, arch=arch, data=data_set.spec, settings=settings)
    if run.process.adapts_to_losses:
        # the stacked steps compute the loss themselves and never call Process.observe_losses
        raise ConfigError(f"{label or run_dir}: --importance-sampling learns from each run's losses step by step, "
                          f"which cgtools sweep does not record; train this run with cgtools train")
    return SweepMember(run, Path(run_dir), data_set.train, data_set.val, data_set.grammar,
                       provenance("sweep", run.train.seed, sources), label, data_set.meta)


def _trainer(m: SweepMember, device: str, resuming: bool) -> Trainer:
    """The member's Trainer with freshly initialised (or resumed) weights, as `train` builds it."""
    meta = run_meta(m.run, m.grammar, m.provenance, m.data_meta)
    model = build_model(m.run.arch, m.run.model, m.run.process, seed=m.run.train.seed, device=device,
                        grammar=m.grammar, meta=meta)
    tr = Trainer(model, m.run.train, m.run_dir, train_tokens=m.train_tokens, val_tokens=m.val_tokens,
                 grammar=m.grammar, meta=meta, device=device, label=m.label)
    if resuming:
        tr.resume()
    return tr


def clip_stacked_grad_norm_(params: list[torch.Tensor], max_norm: float) -> torch.Tensor:
    """torch.nn.utils.clip_grad_norm_ for each member of stacked parameters [K, ...] separately:
    member k's gradients are scaled by min(1, max_norm / (‖g_k‖ + 1e-6)), ‖g_k‖ its global norm
    over every parameter (torch's formula). Returns the norms before clipping [K]."""
    grads = [p.grad for p in params if p.grad is not None]
    norms = torch.stack([g.flatten(1).norm(dim=1) for g in grads])  # [P, K]
    total = norms.norm(dim=0)  # [K]
    coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
    for g in grads:
        g.mul_(coef.view(-1, *([1] * (g.dim() - 1))))
    return total


def _per_element(value: Any, stacked: torch.Tensor) -> bool:
    """Optimiser-state entries shaped like their (stacked) parameter are sliced; scalars ('step') shared."""
    return torch.is_tensor(value) and value.shape == stacked.shape


class StackedRun:
    """Trainers of one stack key at the same step, trained as one vmapped network.

    Shapes: K live members, B batch, d positions, V symbols; every stacked tensor is [K, ...].
    """

    def __init__(self, trainers: list[Trainer]) -> None:
        self.trainers = trainers
        self.live = list(range(len(trainers)))  # positions in `trainers` still training, stack order
        first = trainers[0]
        self.cfg, self.process, self.device = first.cfg, first.model.process, first.device
        # The first member's network is the function template: functional_call swaps the stacked
        # slices in for the duration of each call, its own tensors are never read.
        template = first.model.network

        def forward(params, buffers, x_t, tau):  # one member: x_t [B, d], tau [B] -> [B, d, V]
            return functional_call(template, (params, buffers), (x_t, tau))

        self._forward = vmap(forward)
        self._build()

    # ---- the stack -------------------------------------------------------------------------------
    def _members(self) -> list[Trainer]:
        return [self.trainers[i] for i in self.live]

    def _build(self) -> None:
        """Stack the live Trainers' weights, optimiser states and weight averages."""
        trs = self._members()
        nets = [dict(tr.model.network.named_parameters()) for tr in trs]
        bufs = [dict(tr.model.network.named_buffers()) for tr in trs]
        with torch.no_grad():
            self.params = {n: torch.stack([net[n].detach() for net in nets]).requires_grad_(True)
                           for n in nets[0]}  # name -> [K, ...]
            self.buffers = {n: torch.stack([b[n] for b in bufs]) for n in bufs[0]}
        groups = [{"params": [self.params[n] for n in g["names"]], "lr": g["base_lr"],
                   "base_lr": g["base_lr"], "kind": g.get("kind"), "names": list(g["names"])}
                  for g in trs[0].optimizer.param_groups]
        self.optimizer = make_optimizer(groups, self.cfg)
        for gs, *gms in zip(self.optimizer.param_groups, *(tr.optimizer.param_groups for tr in trs)):
            for ps, *pms in zip(gs["params"], *(g["params"] for g in gms)):
                states = [tr.optimizer.state.get(p) for tr, p in zip(trs, pms)]
                if not all(states):
                    continue  # no step taken yet
                self.optimizer.state[ps] = {
                    k: torch.stack([s[k] for s in states]) if _per_element(v, pms[0]) else
                    (v.clone() if torch.is_tensor(v) else v) for k, v in states[0].items()}
        self.ema = None
        if trs[0].ema is not None:
            self.ema = {k: torch.stack([tr.ema[k] for tr in trs]) for k in trs[0].ema}

    def _sync(self, pos: int, optimizer: bool) -> None:
        """Copy stack slice `pos` into its Trainer (weights, weight average; optimiser state too
        when `optimizer`, as last.safetensors holds it)."""
        tr = self.trainers[self.live[pos]]
        with torch.no_grad():
            for n, p in tr.model.network.named_parameters():
                p.copy_(self.params[n][pos])
            for n, b in tr.model.network.named_buffers():
                b.copy_(self.buffers[n][pos])
        if self.ema is not None:
            tr.ema = {k: v[pos].clone() for k, v in self.ema.items()}
        if not optimizer:
            return
        factor = tr.cfg.lr_factor(tr.step - 1)  # the rate of the last step, as a single run has it
        for gm, gs in zip(tr.optimizer.param_groups, self.optimizer.param_groups):
            gm["lr"] = gm["base_lr"] * factor
            for pm, ps in zip(gm["params"], gs["params"]):
                state = self.optimizer.state.get(ps)
                if state:
                    tr.optimizer.state[pm] = {
                        k: v[pos].clone() if _per_element(v, ps) else
                        (v.clone() if torch.is_tensor(v) else v) for k, v in state.items()}

    def _drop(self, positions: set[int]) -> None:
        """Take the members at `positions` out of the stack; the others continue unchanged."""
        if not positions:
            return
        keep = [pos for pos in range(len(self.live)) if pos not in positions]
        for pos in keep:
            self._sync(pos, optimizer=True)
        self.live = [self.live[pos] for pos in keep]
        if self.live:
            self._build()

    # ---- one step ----------------------------------------------------------------------------------
    def _step(self) -> tuple[list[float], list[bool]]:
        """One optimiser step of every live member: (losses, finite) per member."""
        trs, proc = self._members(), self.process
        step = trs[0].step
        x0, t, x_t = [], [], []
        for tr in trs:  # exactly the draws of Trainer._train_step with this member's seed
            batch = tr.data.batch(step).to(self.device)  # [B, d]
            gen = torch_generator(tr.cfg.seed, "noise", step)
            t_i = proc.sample_t(tr.cfg.batch_size, gen)  # [B]
            x0.append(batch)
            t.append(t_i)
            x_t.append(proc.q_sample(batch, t_i, gen))
        x0, t, x_t = torch.stack(x0), torch.stack(t), torch.stack(x_t)  # [K, B, d], [K, B], [K, B, d]
        K, B = t.shape
        factor = self.cfg.lr_factor(step)
        for g in self.optimizer.param_groups:
            g["lr"] = g["base_lr"] * factor
        autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if self.device.startswith("cuda")
                    else nullcontext())
        tau = proc.network_time(t.reshape(-1)).view(K, B)  # [K, B]
        with warnings.catch_warnings():  # forward and backward (see _FALLBACK_WARNING)
            warnings.filterwarnings("ignore", message=_FALLBACK_WARNING)
            with autocast:
                logits = self._forward(self.params, self.buffers, x_t, tau)  # [K, B, d, V]
            terms = proc.loss(logits.float().flatten(0, 1), x0.flatten(0, 1), x_t.flatten(0, 1), t.flatten())
            losses = terms.loss.view(K, B).mean(1)  # [K], each member's training objective
            finite = torch.isfinite(losses)
            # A diverged member gets no gradient from the sum (and leaves the stack after this step);
            # no operation mixes members, so the others' slices see only their own losses.
            total = torch.where(finite, losses, torch.zeros_like(losses)).sum()
            self.optimizer.zero_grad(set_to_none=True)
            total.backward()
        if self.cfg.grad_clip is not None:
            clip_stacked_grad_norm_(list(self.params.values()), self.cfg.grad_clip)
        self.optimizer.step()
        if self.ema is not None:
            with torch.no_grad():
                current = {**self.params, **self.buffers}
                for k, avg in self.ema.items():  # the keys of the network's state_dict
                    v = current[k]
                    avg.lerp_(v, 1 - self.cfg.ema) if v.is_floating_point() else avg.copy_(v)
        return losses.detach().tolist(), finite.tolist()

    # ---- the run -----------------------------------------------------------------------------------
    def run(self, stop_after: int | None = None, interrupt: threading.Event | None = None
            ) -> tuple[list[TrainResult], list[str | None]]:
        """Train every member to its end (steps, early stopping or divergence); per member its
        result and None, or the divergence message. interrupt: as in Trainer.run."""
        self.errors: list[str | None] = [None] * len(self.trainers)
        errors = self.errors
        stopped = [False] * len(self.trainers)
        for tr in self.trainers:
            (tr.run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
            tr.model.network.train()
        start, t0 = self.trainers[0].step, time.perf_counter()
        elapsed0 = [tr.elapsed for tr in self.trainers]
        total = sum(tr.cfg.steps - tr.step for tr in self.trainers)
        with progress(total, f"train {len(self.trainers)} stacked") as bar:
            try:
                while self.live:
                    if stop_after is not None and self._members()[0].step - start >= stop_after:
                        break
                    if interrupt is not None and interrupt.is_set():
                        raise KeyboardInterrupt
                    losses, finite = self._step()
                    bar.advance(len(self.live))
                    now = time.perf_counter()
                    leaving = {pos for pos, ok in enumerate(finite) if not ok}
                    for pos, i in enumerate(self.live):  # every counter first: a Ctrl-C below saves consistent states
                        tr = self.trainers[i]
                        if pos in leaving:
                            errors[i] = f"training diverged at step {tr.step} (loss {losses[pos]}); lower --lr"
                        else:
                            tr.step += 1
                            tr.elapsed = elapsed0[i] + now - t0
                    for pos, (i, loss) in enumerate(zip(list(self.live), losses)):
                        if pos in leaving:
                            continue
                        tr = self.trainers[i]
                        due = tr.eval_due()
                        if due or tr.step in tr.keep:
                            self._sync(pos, optimizer=due)
                        row, stop = tr.after_step(loss)
                        if row is not None:
                            bar.update(loss=row["train_loss"], val=row["val_loss"])
                        stopped[i] = stop
                        if stop or tr.step >= tr.cfg.steps:
                            leaving.add(pos)
                    self._drop(leaving)
            except KeyboardInterrupt:
                self._save_live()  # resume from here with --resume
                raise
        if stop_after is not None:
            self._save_live()
        results = [TrainResult(tr.step, tr.best_step, tr.best_val, stopped[i], tr.rows)
                   for i, tr in enumerate(self.trainers)]
        return results, errors

    def _save_live(self) -> None:
        """last.safetensors of every member still in the stack (not of one that just diverged)."""
        for pos, i in enumerate(self.live):
            if self.errors[i]:
                continue
            self._sync(pos, optimizer=True)
            self.trainers[i]._save_last()
