"""Cost of the checkpoint integrity check: CRC-32 of every tensor, written and verified on load.

A width-4096 RHM U-Net (L = 3, s = 2, K = 8; model + Adam moments, the file `cgtools train`
writes) is saved and loaded with `cgtools.formats.checkpoint`; the same run times the
checksums alone and a plain safetensors save/load of the same tensors (the baseline without
integrity), so the overhead is a ratio measured in one process:

    .venv/bin/python bench/checkpoint.py [--width 4096] [--repeat 3]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from cgtools.formats.checkpoint import Checkpoint, save_checkpoint, tensor_checksum
from cgtools.formats.files import open_input
from cgtools.models.unet import UNet, UNetConfig

from timing import best_of


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=4096)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()

    net = UNet(UNetConfig(vocab=8, depth=3, branching=2, width=args.width), seed=0)
    model = {k: v.detach() for k, v in net.state_dict().items()}
    opt = torch.optim.Adam(net.parameters())
    for p in net.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    tensors = {f"model.{k}": v for k, v in model.items()}
    for i, st in opt.state_dict()["state"].items():
        tensors.update({f"opt.{i}.{k}": v for k, v in st.items() if v.dim() > 0})
    nbytes = sum(t.numel() * t.element_size() for t in tensors.values())

    with tempfile.TemporaryDirectory() as tmp:
        ours, plain = Path(tmp) / "ours.safetensors", Path(tmp) / "plain.safetensors"
        crc = best_of(args.repeat, lambda: [tensor_checksum(t) for t in tensors.values()])
        save_ours = best_of(args.repeat, lambda: save_checkpoint(ours, model, {"arch": "unet"},
                                                                 optimizer=opt.state_dict(), force=True))
        save_plain = best_of(args.repeat, lambda: save_file(tensors, plain))
        load_ours = best_of(args.repeat, lambda: Checkpoint(open_input(ours)))
        # safetensors maps the file lazily: the baseline touches every byte, as using the weights does
        load_plain = best_of(args.repeat, lambda: [v.clone() for v in load_file(plain).values()])
        size = ours.stat().st_size

    print(f"width {args.width}: {nbytes / 2**20:.0f} MiB of tensors, file {size / 2**20:.0f} MiB")
    print(f"CRC-32 of all tensors   {crc:7.3f} s  ({nbytes / crc / 1e9:.2f} GB/s)")
    print(f"save: ours {save_ours:7.3f} s, plain safetensors {save_plain:7.3f} s  (x{save_ours / save_plain:.2f})")
    print(f"checksums / our save {crc / save_ours:.1%}; checksums / our load {crc / load_ours:.1%}")
    print(f"load: ours {load_ours:7.3f} s, plain safetensors + reading {load_plain:7.3f} s  (x{load_ours / load_plain:.2f})")


if __name__ == "__main__":
    main()
