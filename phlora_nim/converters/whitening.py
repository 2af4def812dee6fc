"""Activation-aware decomposition: truncate ΔW where the inputs make it matter (whitened SVD).

Plain PHLoRA keeps the directions of largest ‖ΔW‖_F. What a served adapter has to reproduce is
the module's *output* change ΔW·x on the inputs it will see. With C = E[x xᵀ] = L Lᵀ (Cholesky,
with a small ridge), E‖(ΔW − B A) x‖² = ‖(ΔW − B A) L‖²_F, so the best rank-r adapter for the
outputs is B A = trunc_r(ΔW L) · L⁻¹ (SVD-LLM; ASVD scales by activations in the same spirit).

The factors keep the :class:`Factors` interface: ``S`` are the singular values of ΔW L (output
energies, which rank policies then spend), ``Vh`` is the input side ``W_hᵀ L⁻¹``, so
``lora(r)`` returns A, B with B A = trunc_r(ΔW L) L⁻¹. Weight-space energies are carried along,
computed exactly, so reports stay honest about how much of ΔW itself an adapter keeps.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from phlora_nim.converters.decompose import Factors, decompose, frobenius_energy

# Ridge added to C, relative to its mean diagonal: keeps the Cholesky factor well conditioned when
# calibration tokens are fewer than input dimensions, and tends to plain SVD as it grows.
DEFAULT_RIDGE = 1e-2


@dataclass(frozen=True)
class WhitenedFactors(Factors):
    """Factors of ΔW L mapped back to weight space, with weight-space energies per triplet.

    Attributes:
        weight_gain: ``[l]`` float64: how much of ‖ΔW‖²_F the i-th triplet removes from the residual
            (``‖ΔW − B_r A_r‖² = weight_total − Σ_{i≤r} weight_gain_i``, exact for orthonormal U).
        weight_total: ‖ΔW‖²_F in float64.
    """

    weight_gain: torch.Tensor
    weight_total: float

    def weight_captured(self, rank: int) -> float:
        return float(self.weight_gain[:rank].sum())

    def weight_energy(self, rank: int) -> float:
        """Share of ‖ΔW‖²_F the rank-``rank`` adapter reproduces: 1 − ‖ΔW − B A‖²/‖ΔW‖²."""
        if self.weight_total == 0.0:
            return 1.0
        return min(1.0, max(0.0, self.weight_captured(rank) / self.weight_total))

    def compact(self) -> WhitenedFactors:
        return dataclasses.replace(
            self, U=self.U.clone(), S=self.S.clone(), Vh=self.Vh.clone(), weight_gain=self.weight_gain.clone()
        )

    def spectrum_only(self) -> WhitenedFactors:
        return dataclasses.replace(self, U=self.U[:, :0].clone(), Vh=self.Vh[:0].clone(), S=self.S.clone())

    def truncated(self, rank: int) -> WhitenedFactors:
        return dataclasses.replace(
            self, U=self.U[:, :rank], S=self.S[:rank], Vh=self.Vh[:rank], weight_gain=self.weight_gain[:rank]
        )


def weight_energy(factors: Factors, rank: int) -> float:
    """Share of ‖ΔW‖²_F kept at ``rank``, whitened or not."""
    return factors.weight_energy(rank) if isinstance(factors, WhitenedFactors) else factors.energy(rank)


def weight_captured(factors: Factors, rank: int) -> tuple[float, float]:
    """(‖ΔW‖²_F reproduced at ``rank``, ‖ΔW‖²_F), whitened or not."""
    if isinstance(factors, WhitenedFactors):
        return factors.weight_captured(rank), factors.weight_total
    return factors.captured(rank), factors.total_energy


def cholesky_factor(moment: torch.Tensor, *, ridge: float = DEFAULT_RIDGE) -> torch.Tensor:
    """Lower-triangular L (float64) with L Lᵀ = C + ridge·mean(diag C)·I, C a second-moment matrix."""
    c = moment.double()
    c = 0.5 * (c + c.T)
    scale = float(c.diagonal().mean())
    if not scale > 0.0:
        scale = 1.0  # inputs were all zero: whitening degenerates to plain SVD
    eye = torch.eye(c.shape[0], dtype=torch.float64)
    jitter = ridge
    for _ in range(6):  # raise the ridge until the factorisation succeeds (float32 moments)
        chol, info = torch.linalg.cholesky_ex(c + jitter * scale * eye)
        if int(info) == 0:
            return chol
        jitter *= 10
    return torch.linalg.cholesky(c + jitter * scale * eye)


def whitened_decompose(
    delta: torch.Tensor,
    chol: torch.Tensor,
    rank: int,
    *,
    exact: bool = False,
    seed: int = 0,
    device: str | torch.device = "cpu",
) -> WhitenedFactors:
    """The ``rank`` leading triplets of ΔW L, mapped back so that ``lora(r)`` gives trunc_r(ΔW L) L⁻¹.

    Args:
        delta: ``[out, in]`` weight delta.
        chol: ``[in, in]`` lower Cholesky factor of the inputs' second moment (:func:`cholesky_factor`).
        rank: triplets wanted; exact, exact=False as in :func:`decompose`.

    Example:
        >>> x = torch.randn(256, 32) * torch.linspace(0.1, 3, 32)
        >>> f = whitened_decompose(torch.randn(16, 32), cholesky_factor(x.T @ x / 256), 4)
        >>> a, b = f.lora(4); (b @ a).shape
        torch.Size([16, 32])
    """
    if chol.shape != (delta.shape[1], delta.shape[1]):
        raise ValueError(f"Cholesky factor {tuple(chol.shape)} does not fit a delta of shape {tuple(delta.shape)}")
    d64 = delta.double()
    weighted = (d64 @ chol).float()
    f = decompose(weighted, rank, exact=exact, seed=seed, device=device)
    # Input side W_hᵀ L⁻¹: solve X L = W_h for X (triangular, no explicit inverse).
    vh = torch.linalg.solve_triangular(chol, f.Vh.double(), upper=False, left=False)
    # ‖ΔW − Σ_{i≤r} s_i u_i v_iᵀ‖² = ‖ΔW‖² − Σ_i (2 s_i u_iᵀ ΔW v_i − s_i² ‖v_i‖²) for orthonormal u_i.
    s = f.S.double()
    cross = ((f.U.double().T @ d64) * vh).sum(dim=1)
    gain = 2 * s * cross - s.pow(2) * vh.pow(2).sum(dim=1)
    return WhitenedFactors(
        U=f.U,
        S=f.S,
        Vh=vh.float(),
        total_energy=f.total_energy,
        power_iterations=f.power_iterations,
        exact=f.exact,
        weight_gain=gain,
        weight_total=frobenius_energy(delta),
    )
