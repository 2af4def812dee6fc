"""Randomized SVD accuracy, exactness of the factors, float64 energy accounting."""

from __future__ import annotations

import math

import pytest
import torch

from phlora_nim.converters.decompose import decompose, frobenius_energy


def _with_spectrum(m: int, n: int, sigma: torch.Tensor, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    k = min(m, n)
    u, _ = torch.linalg.qr(torch.randn(m, k, generator=gen))
    v, _ = torch.linalg.qr(torch.randn(n, k, generator=gen))
    return (u * sigma[:k]) @ v.T


SPECTRA = {
    "power 1": lambda i: i**-1.0,
    "power 0.5": lambda i: i**-0.5,
    "nearly flat (power 0.1)": lambda i: i**-0.1,
    "flat": lambda i: 1 / (1 + 1e-3 * i),
    "exponential": lambda i: torch.exp(-i / 15),
}


@pytest.mark.parametrize("name", SPECTRA)
@pytest.mark.parametrize(("m", "n", "rank"), [(384, 768, 16), (768, 384, 48)])
def test_randomized_energy_within_0p1_percent_of_exact(name: str, m: int, n: int, rank: int) -> None:
    i = torch.arange(1, min(m, n) + 1, dtype=torch.float32)
    delta = _with_spectrum(m, n, SPECTRA[name](i))
    exact = decompose(delta, rank, exact=True).captured(rank)
    approx = decompose(delta, rank).captured(rank)
    assert approx / exact >= 0.999


def test_gaussian_noise_is_handled() -> None:
    delta = torch.randn(512, 1024, generator=torch.Generator().manual_seed(3))
    exact = decompose(delta, 32, exact=True).captured(32)
    assert decompose(delta, 32).captured(32) / exact >= 0.999


def test_lora_factors_reproduce_truncated_svd() -> None:
    delta = _with_spectrum(96, 80, torch.arange(1, 81, dtype=torch.float32) ** -0.7)
    f = decompose(delta, 10, exact=True)
    a, b = f.lora(10)
    u, s, vh = torch.linalg.svd(delta.double(), full_matrices=False)
    best = (u[:, :10] * s[:10]) @ vh[:10]
    assert torch.allclose((b @ a).double(), best, atol=1e-5)
    # The reported error is exactly the residual of the approximation.
    resid = (delta.double() - (b @ a).double()).norm() / delta.double().norm()
    assert f.relative_error(10) == pytest.approx(float(resid), rel=1e-4)


def test_randomized_factors_are_an_orthogonal_projection() -> None:
    delta = _with_spectrum(300, 500, torch.arange(1, 301, dtype=torch.float32) ** -0.6)
    f = decompose(delta, 20)
    a, b = f.lora(20)
    resid = frobenius_energy(delta - b @ a)
    assert resid == pytest.approx(f.total_energy - f.captured(20), rel=1e-3)


def test_full_rank_is_exact() -> None:
    delta = torch.randn(40, 24, generator=torch.Generator().manual_seed(1))
    f = decompose(delta, 24)
    a, b = f.lora(24)
    assert torch.allclose(b @ a, delta, atol=1e-5)
    assert f.energy(24) == pytest.approx(1.0, abs=1e-6)


def test_energy_accumulates_in_float64() -> None:
    # 2^24 + k ones in float32 naive accumulation stalls at 2^24; float64 accounting must not.
    delta = torch.ones(4096, 4200)
    assert frobenius_energy(delta) == pytest.approx(4096 * 4200, rel=1e-6)
    noisy = torch.randn(3000, 5000, generator=torch.Generator().manual_seed(2)) * 1e-3
    assert math.isclose(frobenius_energy(noisy), float(noisy.double().pow(2).sum()), rel_tol=1e-6)


def test_zero_delta() -> None:
    f = decompose(torch.zeros(8, 6), 3)
    assert f.total_energy == 0.0 and f.energy(3) == 1.0


def test_reproducible_with_seed() -> None:
    delta = torch.randn(200, 300, generator=torch.Generator().manual_seed(5))
    a1, _ = decompose(delta, 8, seed=7).lora(8)
    a2, _ = decompose(delta, 8, seed=7).lora(8)
    assert torch.equal(a1, a2)
