"""Benchmark of the diffusion samplers: samples/s and network evaluations (NFE) per sample.

Cases: uniform D3PM with every level, uniform respaced to --steps levels, masked diffusion
uncached, and masked with the cache (the network is evaluated only on rows that changed).
Baselines measured in the same run:
* the network floor: the same number of forward passes of the same network on the same batch
  size, nothing else (sampler time / floor = the sampler's own overhead);
* the full uniform sampler (speed-up of each case relative to it);
* this machine's matmul rate (a square float32 GEMM, same threads): the fraction of it that a
  reverse step of the U-Net achieves (its forward GEMM FLOPs per step / step time).

The network is the RHM U-Net (cgtools.models.unet, untrained, seed 0) when it imports, else a
tiny stand-in (--net toy): NFE counts do not depend on training, but the cache's saving does
(an untrained network unmasks at the same rate as a trained one, so it is representative).

Usage: python bench/sample.py [--net unet|toy] [--width 256] [-L 3] [-s 2] [-K 8] [--num 512]
                              [--T 200] [--steps 50] [--threads 2] [--repeat 2]
"""

from __future__ import annotations

import argparse
import math
import time

import torch

from cgtools.diffusion import MaskedConfig, UniformConfig, make_process, sample
from timing import matmul_rate  # bench/timing.py (the script's own folder is on sys.path)


class Counted:
    """A denoiser that counts calls and evaluated rows."""

    def __init__(self, fn):
        self.fn, self.sizes = fn, []

    def __call__(self, x, t):
        self.sizes.append(x.shape[0])
        return self.fn(x, t)


class ToyNet(torch.nn.Module):
    """Stand-in network: embedding, one hidden layer over the whole sequence, time bias."""

    def __init__(self, vocab: int, input_vocab: int, length: int, width: int):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.embed = torch.nn.Parameter(torch.randn(input_vocab, width, generator=g) / width**0.5)
        flat = length * width
        self.mix = torch.nn.Parameter(torch.randn(flat, flat, generator=g) / flat**0.5)
        self.out = torch.nn.Parameter(torch.randn(width, vocab, generator=g) / width)
        self.time = torch.nn.Parameter(torch.randn(width, generator=g))
        self.length, self.width = length, width

    def forward(self, x, t):
        h = self.embed[x] + t.float()[:, None, None] * self.time  # [B, d, n]
        h = torch.nn.functional.gelu(h.reshape(len(x), -1) @ self.mix).view(len(x), self.length, self.width)
        return h @ self.out  # [B, d, K]


def build_network(kind: str, vocab: int, masked: bool, depth: int, branching: int, width: int):
    if kind == "unet":
        from cgtools.models.unet import UNet, UNetConfig
        cfg = UNetConfig(vocab=vocab, input_vocab=vocab + 1 if masked else vocab, depth=depth,
                         branching=branching, width=width, time_embedding=not masked)
        return UNet(cfg, seed=0).eval()
    return ToyNet(vocab, vocab + 1 if masked else vocab, branching**depth, width).eval()


def denoiser_for(net, process):
    def denoiser(x, t):
        return torch.log_softmax(net(x, process.network_time(t)).float(), -1)
    return denoiser


def floor_seconds(net, process, length: int, sizes: list[int]) -> float:
    """Time of bare forward passes with the same batch sizes as the sampler's calls.

    Equal sizes: 20 passes timed and scaled; varying sizes (cache): every call replayed.
    """
    if not sizes:
        return float("nan")
    start = process.time_grid()[0]

    def forward(b):
        t = process.full_time(start, b, "cpu")
        net(torch.randint(process.vocab, (b, length)), process.network_time(t))

    replay = sizes if len(set(sizes)) > 1 else sizes[:20]
    with torch.inference_mode():
        forward(max(sizes))  # warm-up
        t0 = time.perf_counter()
        for b in replay:
            forward(b)
    return (time.perf_counter() - t0) * len(sizes) / len(replay)


def run_case(name, process, net, args, steps, cache):
    """Best of --repeat runs for the sampler and for its network floor (the machine is shared)."""
    best, best_floor, den = math.inf, math.inf, None
    for _ in range(args.repeat):
        den = Counted(denoiser_for(net, process))
        gen = torch.Generator().manual_seed(0)
        t0 = time.perf_counter()
        sample(process, den, args.num, args.branching**args.depth, gen, steps=steps, batch_size=args.num,
               cache=cache)
        best = min(best, time.perf_counter() - t0)
        best_floor = min(best_floor, floor_seconds(net, process, args.branching**args.depth, den.sizes))
    return dict(name=name, seconds=best, per_s=args.num / best, nfe=sum(den.sizes) / args.num,
                calls=len(den.sizes), floor=best_floor)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--net", choices=["unet", "toy"], default=None)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("-L", "--depth", type=int, default=3)
    parser.add_argument("-s", "--branching", type=int, default=2)
    parser.add_argument("-K", "--vocab", type=int, default=8)
    parser.add_argument("--num", type=int, default=512)
    parser.add_argument("--T", type=int, default=200)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.net is None:
        try:
            import cgtools.models.unet  # noqa: F401
            args.net = "unet"
        except ImportError:
            args.net = "toy"

    uniform = make_process(UniformConfig(T=args.T, schedule="linear-alpha"), args.vocab)
    masked = make_process(MaskedConfig(), args.vocab)
    net_u = build_network(args.net, args.vocab, False, args.depth, args.branching, args.width)
    net_m = build_network(args.net, args.vocab, True, args.depth, args.branching, args.width)
    with torch.inference_mode():  # warm-up (thread pools, allocator)
        for net, proc in ((net_u, uniform), (net_m, masked)):
            sample(proc, denoiser_for(net, proc), args.num, args.branching**args.depth,
                   torch.Generator().manual_seed(0), steps=2, batch_size=args.num)
    rows = [
        run_case(f"uniform, all {args.T} levels", uniform, net_u, args, None, None),
        run_case(f"uniform, respaced to {args.steps}", uniform, net_u, args, args.steps, None),
        run_case(f"masked, {args.T} steps, uncached", masked, net_m, args, args.T, False),
        run_case(f"masked, {args.T} steps, cached", masked, net_m, args, args.T, True),
    ]
    base = rows[0]["seconds"]
    d = args.branching**args.depth
    print(f"net={args.net} width={args.width} d={d} K={args.vocab} samples={args.num} "
          f"threads={args.threads}")
    if args.net == "unet":
        from cgtools.models.unet import flops_forward

        rate = matmul_rate()
        step_flops = flops_forward(net_u.config, args.num)
        step = rows[0]["seconds"] / args.T
        fwd = rows[0]["floor"] / args.T
        print(f"matmul rate {rate / 1e9:.1f} GFLOP/s; uniform reverse step {step * 1e3:.1f} ms "
              f"({step_flops / 1e9:.2f} GFLOP): {step_flops / step / rate:.0%} of the matmul rate "
              f"(bare forward {step_flops / fwd / rate:.0%})")
    print(f"{'case':<34}{'s':>8}{'samples/s':>11}{'NFE/sample':>12}{'vs floor':>10}{'speed-up':>10}")
    for r in rows:
        print(f"{r['name']:<34}{r['seconds']:>8.2f}{r['per_s']:>11.1f}{r['nfe']:>12.1f}"
              f"{r['seconds'] / r['floor']:>10.2f}{base / r['seconds']:>10.2f}")


if __name__ == "__main__":
    main()
