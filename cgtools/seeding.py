"""Explicit random streams. The library never touches a global RNG.

Every random draw in cgtools comes from a stream named by (seed, purpose), so two purposes never
share random numbers and adding a new random step does not change the existing ones.
Counter-based streams (:func:`item_words`) give each item (e.g. sentence number j) its own random
words, so results do not depend on how the work is batched.
"""

from __future__ import annotations

import zlib

import numpy as np


def _purpose_code(purpose: str) -> int:
    # A stable 32-bit code per purpose name (hash() is salted per process, crc32 is not).
    return zlib.crc32(purpose.encode())


def seed_sequence(seed: int, purpose: str, *extra: int) -> np.random.SeedSequence:
    """SeedSequence for one named purpose, independent of every other purpose under the same seed."""
    if seed < 0:
        raise ValueError(f"seeds must be non-negative, got {seed}")
    return np.random.SeedSequence(entropy=seed, spawn_key=(_purpose_code(purpose), *extra))


def generator(seed: int, purpose: str, *extra: int) -> np.random.Generator:
    """A numpy Generator (PCG64) for one purpose."""
    return np.random.Generator(np.random.PCG64(seed_sequence(seed, purpose, *extra)))


def item_words(seed: int, purpose: str, start: int, count: int, words_per_item: int) -> np.ndarray:
    """Random uint64 words for items start..start+count-1, shape (count, words_per_item).

    Item j always receives the same words whatever `start` and `count` are (Philox counter mode:
    item j owns counter blocks [j*b, (j+1)*b) with b = ceil(words_per_item / 4)).
    """
    blocks = -(-words_per_item // 4)
    key = seed_sequence(seed, purpose).generate_state(2, np.uint64)
    bit_gen = np.random.Philox(key=key)
    if start:
        bit_gen.advance(start * blocks)
    raw = bit_gen.random_raw(count * blocks * 4).reshape(count, blocks * 4)
    return raw[:, :words_per_item]


def words_to_below(words: np.ndarray, bound: np.ndarray | int) -> np.ndarray:
    """Map uniform uint64 words to integers in [0, bound) as floor(w * bound / 2^64).

    `bound` must be <= 2^32; each outcome then has probability within a relative 2^-32 of
    1/bound. Returns int64 of the broadcast shape.
    """
    w = np.asarray(words, dtype=np.uint64)
    b = np.asarray(bound, dtype=np.uint64)
    if np.any(b > np.uint64(1 << 32)) or np.any(b == 0):
        raise ValueError("bound must be in [1, 2^32]")
    hi = w >> np.uint64(32)
    lo = w & np.uint64(0xFFFFFFFF)
    # floor((hi*2^32 + lo) * b / 2^64) = (hi*b + (lo*b >> 32)) >> 32, all products < 2^64.
    return ((hi * b + ((lo * b) >> np.uint64(32))) >> np.uint64(32)).astype(np.int64)


def derived_seed(seed: int, purpose: str, *extra: int) -> int:
    """A 63-bit integer seed for one purpose (e.g. to seed a torch.Generator per training step)."""
    return int(seed_sequence(seed, purpose, *extra).generate_state(1, np.uint64)[0] >> np.uint64(1))


def torch_generator(seed: int, purpose: str, *extra: int, device: str = "cpu"):
    """A torch.Generator on `device` seeded for one purpose (torch is imported lazily)."""
    import torch

    gen = torch.Generator(device=device)
    gen.manual_seed(derived_seed(seed, purpose, *extra))
    return gen
