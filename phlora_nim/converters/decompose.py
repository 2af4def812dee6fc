"""Low-rank decomposition of weight deltas: randomized block Krylov SVD with an adaptive stop.

The randomized path starts as Halko, Martinsson & Tropp (2011) do, with a Gaussian range finder
and oversampling, then grows a block Krylov basis (Musco & Musco, 2015) one block per step until
the energy captured by the top ``rank`` directions stops growing. Flat spectra need more steps than
fast-decaying ones, so the count adapts per matrix instead of being fixed. Compute is float32;
energies are float64.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import torch

# Beyond this fraction of the short side a full SVD is as cheap as sketching, and exact.
_EXACT_FRACTION = 0.5
# Stop once the energy further Krylov steps could add is estimated below this share (the accuracy
# bar is 1e-3 of the optimum: a 10× margin).
_ENERGY_TOL = 1e-4
_MAX_BLOCKS = 10


@dataclass(frozen=True)
class Factors:
    """Leading singular triplets of ΔW plus the full energy ‖ΔW‖²_F.

    Attributes:
        U: ``[out, l]`` orthonormal columns (float32).
        S: ``[l]`` singular values, descending (float32).
        Vh: ``[l, in]`` orthonormal rows (float32).
        total_energy: ‖ΔW‖²_F accumulated in float64 over the *whole* delta.
        power_iterations: Krylov blocks added after the first (0 for a direct exact SVD); the
            field keeps its name for the reports that read it.
        exact: True when computed by a full SVD.
    """

    U: torch.Tensor
    S: torch.Tensor
    Vh: torch.Tensor
    total_energy: float
    power_iterations: int
    exact: bool

    @property
    def available_rank(self) -> int:
        return int(self.S.shape[0])

    def captured(self, rank: int) -> float:
        """Σ_{i≤rank} σ_i² in float64."""
        return float(self.S[:rank].double().pow(2).sum())

    def energy(self, rank: int) -> float:
        """Share of ‖ΔW‖²_F kept at ``rank`` (1.0 for an all-zero delta)."""
        if self.total_energy == 0.0:
            return 1.0
        return min(1.0, self.captured(rank) / self.total_energy)

    def relative_error(self, rank: int) -> float:
        """‖ΔW − ΔW_r‖_F / ‖ΔW‖_F. Exact identity: ΔW_r = U_r U_rᵀ ΔW is an orthogonal projection."""
        return math.sqrt(max(0.0, 1.0 - self.energy(rank)))

    def lora(self, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
        """LoRA factors ``(A [rank, in], B [out, rank])`` with B @ A = ΔW_rank, σ split evenly.

        Splitting √σ into both factors keeps their magnitudes balanced, which matters once they are
        stored in fp16/bf16.
        """
        root = self.S[:rank].clamp_min(0).sqrt()
        # Row-major strides even for rank 1: LAPACK's column-major U makes a [out, 1] slice with a
        # stride of ``out`` on its size-1 axis, which .contiguous() accepts but byte views refuse.
        a = (root[:, None] * self.Vh[:rank]).clone(memory_format=torch.contiguous_format)
        b = (self.U[:, :rank] * root[None, :]).clone(memory_format=torch.contiguous_format)
        return a, b

    def compact(self) -> Factors:
        """The same factors in their own storage (slices of a larger sketch pin all of it)."""
        return Factors(
            self.U.clone(), self.S.clone(), self.Vh.clone(), self.total_energy, self.power_iterations, self.exact
        )

    def spectrum_only(self) -> Factors:
        """Singular values and energies without the vectors (for reports once factors are taken)."""
        return Factors(
            self.U[:, :0].clone(),
            self.S.clone(),
            self.Vh[:0].clone(),
            self.total_energy,
            self.power_iterations,
            self.exact,
        )

    def truncated(self, rank: int) -> Factors:
        """The same factors cut to ``rank`` triplets (views share storage)."""
        return Factors(
            U=self.U[:, :rank],
            S=self.S[:rank],
            Vh=self.Vh[:rank],
            total_energy=self.total_energy,
            power_iterations=self.power_iterations,
            exact=self.exact,
        )


def frobenius_energy(delta: torch.Tensor) -> float:
    """‖delta‖²_F accumulated in float64.

    Rows are reduced in float32 (short, pairwise-summed) and the row sums in float64: as accurate as a
    float64 pass, ~20× faster, and with no float64 copy of the matrix.
    """
    if delta.numel() == 0:
        return 0.0
    if delta.dim() < 2:
        return float(delta.double().pow(2).sum())
    rows = torch.linalg.vector_norm(delta.reshape(delta.shape[0], -1).float(), dim=1)
    return float(rows.double().pow(2).sum())


def module_seed(name: str, seed: int = 0) -> int:
    """A stable per-module seed so extraction is reproducible across runs and machines."""
    digest = hashlib.blake2b(f"{seed}:{name}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & 0x7FFF_FFFF_FFFF_FFFF


def decompose(
    delta: torch.Tensor,
    rank: int,
    *,
    exact: bool = False,
    seed: int = 0,
    device: str | torch.device = "cpu",
    oversample: int | None = None,
    total_energy: float | None = None,
) -> Factors:
    """The ``rank`` leading singular triplets of a 2-D delta.

    Args:
        delta: ``[out, in]`` weight delta (any float dtype; computed in float32).
        rank: triplets wanted (capped at the short side).
        exact: full SVD instead of the randomized range finder.
        seed: seed of the Gaussian test matrix (see :func:`module_seed`).
        device: where to compute (``cpu`` or ``cuda``); results come back on the CPU.
        oversample: extra sketch columns (default ``max(10, rank // 4)``).
        total_energy: ‖delta‖²_F if already known.

    Returns:
        :class:`Factors` holding at least ``rank`` triplets (more when the sketch had them).

    Example:
        >>> f = decompose(torch.randn(64, 32) @ torch.randn(32, 48), 8)
        >>> f.lora(8)[0].shape, f.lora(8)[1].shape
        (torch.Size([8, 48]), torch.Size([64, 8]))
    """
    if delta.dim() != 2:
        raise ValueError(f"decompose expects a 2-D tensor, got shape {tuple(delta.shape)}")
    energy = frobenius_energy(delta) if total_energy is None else total_energy
    m, n = delta.shape
    short = min(m, n)
    rank = max(1, min(rank, short))
    a = delta.to(device=device, dtype=torch.float32)
    if energy == 0.0:
        z = torch.zeros(rank)
        return Factors(torch.zeros(m, rank), z, torch.zeros(rank, n), 0.0, 0, exact=True)
    sketch = min(short, rank + (oversample if oversample is not None else max(10, rank // 4)))
    if exact or sketch >= _EXACT_FRACTION * short:
        u, s, vh = torch.linalg.svd(a, full_matrices=False)
        return Factors(u.cpu(), s.cpu(), vh.cpu(), energy, 0, exact=True)
    return _randomized(a, rank, sketch, seed=seed, total_energy=energy)


def _orth(x: torch.Tensor) -> torch.Tensor:
    return torch.linalg.qr(x, mode="reduced").Q


def _top_energy(gram: torch.Tensor, rank: int) -> float:
    # Singular values of QᵀA are the square roots of the eigenvalues of the small Gram ZᵀZ, Z = AᵀQ.
    eig = torch.linalg.eigvalsh(gram.double()).flip(0)
    return float(eig[:rank].clamp_min(0).sum())


def _randomized(a: torch.Tensor, rank: int, sketch: int, *, seed: int, total_energy: float) -> Factors:
    """Block Krylov range finder (Musco & Musco, 2015) with an adaptive stop.

    The basis grows by one orthonormal block per step: Q_{j+1} ⟂ [Q_0 … Q_j] from A·(AᵀQ_j). Each
    step's AᵀQ_j is kept, so the projected matrix QᵀA, and the energy its top ``rank`` directions
    capture, cost no extra pass over A. Krylov reaches near-optimal subspaces on flat spectra in a
    few steps where plain subspace iteration stalls. The loop stops when the extrapolated gain of
    further steps (geometric tail of the last two gains) drops below ``_ENERGY_TOL``; if it never
    does within the step cap, an exact SVD settles it.
    """
    m, n = a.shape
    gen = torch.Generator(device=a.device).manual_seed(seed)
    omega = torch.randn(n, sketch, generator=gen, device=a.device, dtype=a.dtype)
    q_blocks = [_orth(a @ omega)]
    z_blocks = [a.T @ q_blocks[0]]
    gram = z_blocks[0].T @ z_blocks[0]
    gains: list[float] = []
    captured = _top_energy(gram, rank)
    converged = captured >= total_energy * (1 - 1e-6)
    max_cols = min(m, n)
    while not converged and len(q_blocks) < _MAX_BLOCKS and (len(q_blocks) + 1) * sketch <= max_cols:
        y = a @ z_blocks[-1]
        basis = torch.cat(q_blocks, dim=1)
        for _ in range(2):  # Gram-Schmidt twice: float32 loses orthogonality otherwise
            y = y - basis @ (basis.T @ y)
        q_new = _orth(y)
        z_new = a.T @ q_new
        z_all = torch.cat(z_blocks, dim=1)
        cross = z_all.T @ z_new
        gram = torch.cat([torch.cat([gram, cross], dim=1), torch.cat([cross.T, z_new.T @ z_new], dim=1)], dim=0)
        q_blocks.append(q_new)
        z_blocks.append(z_new)
        now = _top_energy(gram, rank)
        gains.append(max(0.0, now - captured))
        captured = now
        converged = _converged(gains, captured, total_energy)
    if not converged and len(q_blocks) * sketch < max_cols:
        # Ran out of steps without a confident estimate: settle it exactly.
        u, s, vh = torch.linalg.svd(a, full_matrices=False)
        return Factors(u.cpu(), s.cpu(), vh.cpu(), total_energy, len(q_blocks) - 1, exact=True)
    q = torch.cat(q_blocks, dim=1)
    z = torch.cat(z_blocks, dim=1)
    ub, s, vh = torch.linalg.svd(z.T, full_matrices=False)
    keep = max(rank, sketch)
    u = q @ ub[:, :keep]
    return Factors(u.cpu(), s[:keep].cpu(), vh[:keep].cpu(), total_energy, len(q_blocks) - 1, exact=False)


def _converged(gains: list[float], captured: float, total_energy: float) -> bool:
    if captured >= total_energy * (1 - 1e-6):
        return True
    last = gains[-1]
    if last <= _ENERGY_TOL * captured:  # Krylov gains shrink at least geometrically: the tail is smaller
        return True
    if len(gains) < 2 or gains[-2] <= 0:
        return False
    ratio = last / gains[-2]
    if ratio >= 1:
        return False
    return last * ratio / (1 - ratio) <= _ENERGY_TOL * captured
