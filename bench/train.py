"""Benchmark: U-Net training-step throughput against this machine's fp32 matmul, in the same run.

For each width: forward + backward of the paper's U-Net (time embedding on, additive skips) on a
batch of random sequences, then an SGD-momentum step with μP groups. FLOPs are counted
analytically (cgtools.models.flops_per_step: GEMM FLOPs, backward = 2 × forward). The baseline is
torch.mm of the largest block GEMM, [B·d/s, s·n] @ [s·n, n], timed in rounds interleaved with the
model so that load from other processes hits both alike. Rates and the ratio use the fastest call
of each (the least disturbed by other processes); the median fwd+bwd time is printed as well.

    .venv/bin/python bench/train.py                   # widths 256, 1024, 4096; L=3, s=2, v=16, B=64
    .venv/bin/python bench/train.py --widths 256 --rounds 3

Goal (issue): fwd+bwd FLOP/s ≥ 50 % of the matmul FLOP/s at width ≥ 1024.
Reference: the authors' public U-Net takes ~140 ms per step at width 256 and ~1 s at 1024
(batch 64, v = 16, L = 3) on the project machine.
"""

from __future__ import annotations

import argparse
import ctypes
import statistics
import time

import torch
import torch.nn.functional as F

from cgtools.models import UNet, UNetConfig, flops_per_step, param_groups

AUTHORS_MS = {256: 140.0, 1024: 1000.0}


def keep_freed_memory() -> bool:
    """Ask glibc to serve large blocks from the heap instead of fresh mmaps.

    Every weight gradient is a new tensor; with glibc's default, blocks above 32 MB are mmapped
    and page-faulted on each step, which costs ~0.5 ms per MB on this VM (a 4096-wide step
    allocates ~1 GB of gradients). Returns False where mallopt is unavailable.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3
    return bool(libc.mallopt(m_mmap_threshold, 1 << 30) and libc.mallopt(m_trim_threshold, 1 << 34))


def time_calls(fn, repeat: int) -> list[float]:
    """Seconds of each of `repeat` calls of fn()."""
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def bench_width(width: int, args: argparse.Namespace) -> dict:
    cfg = UNetConfig(vocab=args.vocab, depth=args.depth, branching=args.branching, width=width)
    model = UNet(cfg, seed=0)
    # A small lr keeps the random-data run finite; it does not change the cost.
    opt = torch.optim.SGD(param_groups(model, 1e-3, "sgd"), lr=0.0, momentum=0.9)
    gen = torch.Generator().manual_seed(0)
    B, d, s, n = args.batch, cfg.length, cfg.branching, width
    x0 = torch.randint(0, cfg.vocab, (B, d), generator=gen)
    x_t = torch.where(torch.rand(B, d, generator=gen) < 0.5, x0,
                      torch.randint(0, cfg.vocab, (B, d), generator=gen))
    t = torch.rand(B, generator=gen)

    def fwd_bwd() -> None:
        loss = F.cross_entropy(model(x_t, t).reshape(-1, cfg.vocab), x0.reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()

    a = torch.randn(B * d // s, s * n, generator=gen)  # [B·d/s, s·n], the enc1 GEMM
    w = torch.randn(s * n, n, generator=gen)

    def mm() -> None:
        torch.mm(a, w)

    steps = args.steps or max(2, min(20, int(20 * (256 / width) ** 2)))
    for _ in range(2):  # warm-up: allocator, MKL kernels
        fwd_bwd()
        opt.step()
        mm()
    fb, st, base = [], [], []
    for _ in range(args.rounds):
        fb += time_calls(fwd_bwd, steps)
        st += time_calls(lambda: (fwd_bwd(), opt.step()), steps)
        base += time_calls(mm, max(3, steps))
    flops = flops_per_step(cfg, B)
    t_fb, t_step, t_mm = min(fb), min(st), min(base)
    mm_rate = 2 * a.shape[0] * a.shape[1] * w.shape[1] / t_mm
    return {
        "width": width, "params": sum(p.numel() for p in model.parameters()),
        "gflop": flops / 1e9, "fb_ms": t_fb * 1e3, "fb_median_ms": statistics.median(fb) * 1e3,
        "step_ms": t_step * 1e3, "rate": flops / t_fb / 1e9, "mm_rate": mm_rate / 1e9,
        "ratio": flops / t_fb / mm_rate,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--widths", default="256,1024,4096")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--vocab", type=int, default=16)
    p.add_argument("--depth", type=int, default=3)
    p.add_argument("--branching", type=int, default=2)
    p.add_argument("--rounds", type=int, default=3, help="interleaved model/baseline rounds")
    p.add_argument("--steps", type=int, default=0, help="steps per round (0: by width)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch default)")
    p.add_argument("--no-malloc-tuning", action="store_true",
                   help="keep glibc's default mmap threshold (see keep_freed_memory)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    tuned = False if args.no_malloc_tuning else keep_freed_memory()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, malloc tuning "
          f"{'on' if tuned else 'off'}; L={args.depth}, s={args.branching}, v={args.vocab}, "
          f"batch {args.batch}, SGD momentum 0.9, cross-entropy head")
    print("| width | params | GFLOP/step | fwd+bwd ms (best / median) | step ms (with SGD) "
          "| U-Net GFLOP/s | mm GFLOP/s | ratio | authors' step ms |")
    print("|---|---|---|---|---|---|---|---|---|")
    for width in (int(w) for w in args.widths.split(",")):
        r = bench_width(width, args)
        ref = AUTHORS_MS.get(width)
        print(f"| {r['width']} | {r['params'] / 1e6:.1f} M | {r['gflop']:.2f} "
              f"| {r['fb_ms']:.1f} / {r['fb_median_ms']:.1f} "
              f"| {r['step_ms']:.1f} | {r['rate']:.1f} | {r['mm_rate']:.1f} | {r['ratio']:.0%} "
              f"| {f'~{ref:.0f}' if ref else '-'} |", flush=True)


if __name__ == "__main__":
    main()
