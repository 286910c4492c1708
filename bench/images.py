"""Benchmark of the image half: the DDPM training step and sampler step of the 2-D U-Net, the CNN
features of `cgtools mmd`, and the MMD estimator.

Baselines measured in the same run:
* this machine's matmul rate (a square float32 GEMM on the same threads): the fraction of it that
  a training step, a reverse step and the backbone's forward pass achieve (their FLOPs counted by
  torch.utils.flop_counter, convolutions and matmuls only, over the measured time);
* the MMD estimator against the direct computation it replaces: the three full kernel matrices
  of X ∪ Y built at once in float64 (numpy), no bootstrap — our blocked estimator with 100
  bootstrap replicates costs how many times that one evaluation.

Usage: python bench/images.py [--threads 2] [--batch 64] [--size 8] [--width 32]
       [--channel-mult 1,2,2] [--features 64] [--resolution 224] [--repeat 3]
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

from cgtools.analysis.mmd import gaussian_kernel, median_bandwidth, mmd_statistics
from cgtools.diffusion.registry import make_config, make_process
from cgtools.models.registry import DataSpec, architecture
from timing import best_of, matmul_rate  # bench/timing.py (the script's own folder is on sys.path)


def flops_of(fn) -> int:
    """FLOPs of one call of fn (convolutions and matmuls, forward and backward as called)."""
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def ddpm_cases(args, rate: float) -> None:
    proc = make_process(make_config("gaussian"), None)
    arch = architecture("unet2d")
    cfg = arch.configure(DataSpec(shape=(1, args.size, args.size)), proc,
                         {"width": args.width, "channel_mult": tuple(int(m) for m in args.channel_mult.split(",")),
                          "num_res_blocks": args.num_res_blocks})
    net = arch.build(cfg, proc, 0)
    params = sum(p.numel() for p in net.parameters())
    opt = torch.optim.Adam(net.parameters(), 1e-4)
    gen = torch.Generator().manual_seed(0)
    x0 = torch.randn(args.batch, 1, args.size, args.size, generator=gen).clamp(-1, 1)

    def train_step():
        t = proc.sample_t(args.batch, gen)
        x_t = proc.q_sample(x0, t, gen)
        loss = proc.loss(net(x_t, proc.network_time(t)), x0, x_t, t).loss.mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    sample_batch = 512
    xs = torch.randn(sample_batch, 1, args.size, args.size, generator=gen)
    tau = torch.full((1,), 0.5)

    def reverse_forward():
        with torch.inference_mode():
            net(xs, tau)

    for name, fn, rows in (("DDPM training step", train_step, args.batch),
                           ("reverse step (network)", reverse_forward, sample_batch)):
        seconds = best_of(args.repeat, fn)
        flops = flops_of(fn)
        print(f"{name:<24} unet2d width {args.width} mult {args.channel_mult} ({params / 1e6:.2f} M params), "
              f"{rows} images of {args.size}x{args.size}: {seconds * 1e3:8.1f} ms, {flops / 1e9:6.2f} GFLOP, "
              f"{flops / seconds / 1e9:6.1f} GFLOP/s = {flops / seconds / rate:5.1%} of the matmul rate")


def feature_case(args, rate: float) -> None:
    from cgtools.images.features import load_backbone

    net = load_backbone(resolution=args.resolution)
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (8, 8, 1), dtype=np.uint8) for _ in range(args.features)]
    x = net.preprocess(images)
    with torch.inference_mode():
        seconds = best_of(args.repeat, lambda: net.module.stages(x))
        flops = flops_of(lambda: net.module.stages(x))
        whole = best_of(args.repeat, lambda: net.features(images))
    print(f"{'backbone forward':<24} efficientnet-lite0 at {args.resolution}, batch {args.features}: "
          f"{seconds * 1e3:8.1f} ms, {flops / 1e9:6.2f} GFLOP, {flops / seconds / 1e9:6.1f} GFLOP/s = "
          f"{flops / seconds / rate:5.1%} of the matmul rate; with preprocessing "
          f"{args.features / whole:6.1f} images/s")


def mmd_case(args) -> None:
    rng = np.random.default_rng(0)
    n, dim = 512, 320
    x, y = rng.normal(size=(n, dim)), rng.normal(size=(359, dim))

    def direct():
        sigma = median_bandwidth(x, y)
        kxx, kyy, kxy = (gaussian_kernel(a, b, sigma) for a, b in ((x, x), (y, y), (x, y)))
        m, k = len(x), len(y)
        return ((kxx.sum() - np.trace(kxx)) / (m * (m - 1)) + (kyy.sum() - np.trace(kyy)) / (k * (k - 1))
                - 2 * kxy.mean())

    base = best_of(args.repeat, direct)
    ours = best_of(args.repeat, lambda: mmd_statistics(x, y, bootstrap=100))
    plain = best_of(args.repeat, lambda: mmd_statistics(x, y, bootstrap=0))
    assert abs(direct() - mmd_statistics(x, y, bootstrap=0).mmd2) < 1e-10
    print(f"{'MMD estimator':<24} {n} vs 359 features of dim {dim}: direct (3 full kernels, Gaussian only) "
          f"{base * 1e3:.1f} ms; ours, Gaussian + KID, no bootstrap {plain * 1e3:.1f} ms ({plain / base:.2f}x), "
          f"with 100 bootstrap replicates {ours * 1e3:.1f} ms ({ours / base:.2f}x the direct single estimate)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--size", type=int, default=8)
    parser.add_argument("--width", type=int, default=32)
    parser.add_argument("--channel-mult", default="1,2,2")
    parser.add_argument("--num-res-blocks", type=int, default=1)
    parser.add_argument("--features", type=int, default=64)
    parser.add_argument("--resolution", type=int, default=224)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rate = matmul_rate()
    print(f"matmul rate {rate / 1e9:.1f} GFLOP/s ({args.threads} threads)")
    ddpm_cases(args, rate)
    feature_case(args, rate)
    mmd_case(args)


if __name__ == "__main__":
    main()
