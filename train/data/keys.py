"""Random numbers keyed by (seed, epoch, sample index): each sample's augmentation is the same
whichever loader process, rank, batch or restart draws it.

A counter-based generator (splitmix64's finalizer over the key and a draw number), written
twice with the same bits: in Python integers for one sample in a loader process, and in int64
tensor ops for a whole batch on the device (int64 arithmetic wraps like uint64; only the right
shifts need a mask to be logical).
"""

from __future__ import annotations

import torch

_MASK = (1 << 64) - 1
_GOLDEN = 0x9E3779B97F4A7C15
_M1, _M2 = 0xBF58476D1CE4E5B9, 0x94D049BB133111EB
_EPOCH, _INDEX = 0x632BE59BD9B4E019, 0x85EBCA77C2B2AE63  # keep the three key parts apart
_UNIT = 2.0 ** -53


def _mix(z: int) -> int:
    z = ((z ^ (z >> 30)) * _M1) & _MASK
    z = ((z ^ (z >> 27)) * _M2) & _MASK
    return z ^ (z >> 31)


def sample_key(seed: int, epoch: int, index: int) -> int:
    """The 64-bit key of one sample's draws in one epoch."""
    z = _mix((seed * _GOLDEN) & _MASK)
    z = _mix((z + epoch * _EPOCH) & _MASK)
    return _mix((z + index * _INDEX) & _MASK)


def uniforms(key: int, count: int) -> list[float]:
    """`count` uniform floats in [0, 1) from a sample's key (draw k is the same in batches)."""
    return [(_mix((key + (k + 1) * _GOLDEN) & _MASK) >> 11) * _UNIT for k in range(count)]


def _signed(c: int) -> int:
    return c - (1 << 64) if c >= 1 << 63 else c


def _shr(z: torch.Tensor, s: int) -> torch.Tensor:
    return (z >> s) & ((1 << (64 - s)) - 1)  # a logical shift of the uint64 bits


def _mix_t(z: torch.Tensor) -> torch.Tensor:
    z = (z ^ _shr(z, 30)) * _signed(_M1)
    z = (z ^ _shr(z, 27)) * _signed(_M2)
    return z ^ _shr(z, 31)


def batch_keys(seed: int, epoch: int, indices: torch.Tensor) -> torch.Tensor:
    """`sample_key` of every index in `indices` (int64, any device)."""
    z = _mix((_mix((seed * _GOLDEN) & _MASK) + epoch * _EPOCH) & _MASK)  # without the index
    return _mix_t(indices.long() * _signed(_INDEX) + _signed(z))


def batch_uniforms(keys: torch.Tensor, count: int) -> torch.Tensor:
    """[len(keys), count] float64 uniforms in [0, 1): `uniforms` for each key."""
    steps = torch.arange(1, count + 1, device=keys.device, dtype=torch.int64)
    draws = _mix_t(keys[:, None] + steps[None, :] * _signed(_GOLDEN))
    return _shr(draws, 11).double() * _UNIT
