"""Keyed random draws: exact hash values, position keying, key independence."""

from __future__ import annotations

import hashlib
import struct

import numpy as np
import pytest
import torch

from mergeflow.merging import rng


def py_lowbias32(x: int) -> int:
    """Reference lowbias32 on Python ints (C. Wellons' constants)."""
    x &= 0xFFFFFFFF
    x ^= x >> 16
    x = (x * 0x7FEB352D) & 0xFFFFFFFF
    x ^= x >> 15
    x = (x * 0x846CA68B) & 0xFFFFFFFF
    x ^= x >> 16
    return x


def py_uniform(seed, name, expert, purpose, i):
    k0, k1 = struct.unpack("<II", hashlib.blake2b(f"{seed}\x1f{name}\x1f{expert}\x1f{purpose}".encode(),
                                                   digest_size=8).digest())
    x = py_lowbias32(py_lowbias32(i ^ k0) ^ k1)
    return (x >> 8) / 2**24


@pytest.mark.parametrize("offset", [0, 2**31 - 2, 2**32 - 4])
def test_random_bits_are_the_reference_hash_in_all_32_bits(offset):
    """All 32 bits (uniform keeps 24), across the int32 sign boundary of counters and keys."""
    key = rng.stream_key(3, "model.norm.weight", 0, "mask")
    got = rng.random_bits(key, offset, 4).tolist()
    want = [py_lowbias32(py_lowbias32((offset + i) ^ key[0]) ^ key[1]) for i in range(4)]
    assert [g & 0xFFFFFFFF for g in got] == want


@pytest.mark.parametrize("offset", [0, 12345, 2**31 - 3, 2**32 - 10])
def test_uniform_matches_python_reference(offset):
    key = rng.stream_key(7, "model.layers.0.mlp.up_proj.weight", 2, "dare")
    u = rng.uniform(key, offset, (10,))
    want = [py_uniform(7, "model.layers.0.mlp.up_proj.weight", 2, "dare", offset + i) for i in range(10)]
    assert u.dtype == torch.float32
    assert u.tolist() == want


def test_blocks_draw_the_same_numbers_as_the_whole():
    key = rng.stream_key(1, "w", 0)
    whole = rng.uniform(key, 0, (12, 50))
    parts = torch.cat([rng.uniform(key, r0 * 50, (min(12, r0 + 5) - r0, 50)) for r0 in range(0, 12, 5)])
    assert torch.equal(whole, parts)


def test_keys_separate_seed_tensor_expert_and_purpose():
    base = rng.uniform(rng.stream_key(1, "a", 0, "dare"), 0, (4096,))
    for other in [(2, "a", 0, "dare"), (1, "b", 0, "dare"), (1, "a", 1, "dare"), (1, "a", 0, "magprune")]:
        u = rng.uniform(rng.stream_key(*other), 0, (4096,))
        corr = np.corrcoef(base.numpy(), u.numpy())[0, 1]
        assert abs(corr) < 0.06, other  # independent streams (4096 draws: sd of r ~ 0.016)
        # Not a shifted copy either: no lag within 64 reproduces the base stream.
        for lag in range(64):
            assert not torch.equal(base[lag:lag + 100], u[:100])


def test_uniform_distribution_is_flat():
    u = rng.uniform(rng.stream_key(3, "t", 0), 0, (200_000,)).numpy()
    assert 0.0 <= u.min() and u.max() < 1.0
    counts = np.histogram(u, bins=20, range=(0, 1))[0]
    expected = len(u) / 20
    chi2 = ((counts - expected) ** 2 / expected).sum()
    assert chi2 < 45  # chi-square, 19 dof: p ~ 0.001
    # Neighbouring draws are uncorrelated (counter-based hashes can fail this).
    assert abs(np.corrcoef(u[:-1], u[1:])[0, 1]) < 0.01


def test_mixup_weights_seeded_beta_and_dirichlet():
    a = rng.mixup_weights(42, 0.5, 2)
    assert a == rng.mixup_weights(42, 0.5, 2)
    assert a != rng.mixup_weights(43, 0.5, 2)
    assert abs(sum(a) - 1) < 1e-12 and 0 <= a[0] <= 1
    d = rng.mixup_weights(42, 0.5, 3)
    assert len(d) == 3 and abs(sum(d) - 1) < 1e-9 and min(d) >= 0
    assert rng.mixup_weights(42, 0.0, 2) == [1.0, 0.0]
    # Beta(0.5, 0.5) mean 1/2, variance 1/8: check over many seeds.
    lams = np.array([rng.mixup_weights(s, 0.5, 2)[0] for s in range(2000)])
    assert abs(lams.mean() - 0.5) < 0.03 and abs(lams.var() - 0.125) < 0.015


@pytest.mark.parametrize("offset", [0, 3, 2**32 - 3_000_000])
def test_cpu_fast_path_equals_the_tensor_op_hash(offset):
    # Large draws on the CPU use cache-blocked numpy arithmetic, split over threads.
    key = rng.stream_key(5, "model.embed_tokens.weight", 1, "dare")
    n = 2_500_001
    fast = rng.uniform(key, offset, (n,))
    bits = rng.random_bits(key, offset, n)
    ref = ((bits >> 8) & 0xFFFFFF).to(torch.float32) / 2**24
    assert torch.equal(fast, ref)
    assert fast[-1].item() == py_uniform(5, "model.embed_tokens.weight", 1, "dare", offset + n - 1)
