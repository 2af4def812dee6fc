"""Optimal re-truncation of any LoRA adapter, without forming the dense delta.

With B = Q_B R_B and Aᵀ = Q_A R_A (thin QR), s·B·A = Q_B (s·R_B R_Aᵀ) Q_Aᵀ, so the SVD of the
small r×r core gives the exact SVD of the update at O((in + out)·r²) cost. Truncating it is the best
lower-rank approximation of the adapter's update (Eckart–Young), which for an adapter extracted
by exact SVD equals extracting at the lower rank directly.
"""

from __future__ import annotations

import torch

from phlora_nim.converters.adapter import LoraAdapter, LoraWeights
from phlora_nim.converters.decompose import Factors
from phlora_nim.converters.rank_policy import RankPolicy


def adapter_factors(w: LoraWeights, *, use_rslora: bool = False) -> Factors:
    """The SVD of ``scale · B @ A`` from the factors alone."""
    a = w.a.float()
    b = w.b.float()
    qb, rb = torch.linalg.qr(b, mode="reduced")
    qa, ra = torch.linalg.qr(a.T, mode="reduced")
    core = w.scale(use_rslora=use_rslora) * (rb @ ra.T)
    uc, sc, vch = torch.linalg.svd(core.double(), full_matrices=False)
    energy = float(sc.pow(2).sum())
    return Factors(
        U=qb @ uc.float(), S=sc.float(), Vh=vch.float() @ qa.T, total_energy=energy, power_iterations=0, exact=True
    )


def prune_adapter(adapter: LoraAdapter, policy: RankPolicy) -> tuple[LoraAdapter, list[dict[str, object]]]:
    """Re-truncate every module of ``adapter`` by ``policy`` (ranks never grow).

    Returns:
        The pruned adapter (alpha = r per module: scale 1, the update stored in B·A) and one
        record per module with ``name``, ``shape``, ``old_rank``, ``rank``, ``energy_kept`` (share
        of that module's adapter update) and ``delta_energy``. A module pruned to rank 0 is left
        out together with its bias change (``bias_dropped`` in its record).
    """
    names = sorted(adapter.modules)
    factors = [adapter_factors(adapter.modules[n], use_rslora=adapter.use_rslora) for n in names]
    shorts = [
        min(adapter.modules[n].rank, *adapter.modules[n].b.shape[:1], adapter.modules[n].a.shape[1]) for n in names
    ]
    costs = [adapter.modules[n].a.shape[1] + adapter.modules[n].b.shape[0] for n in names]
    ranks = policy.assign(list(zip(factors, shorts, costs, strict=True)))
    modules: dict[str, LoraWeights] = {}
    records: list[dict[str, object]] = []
    for name, f, rank, short in zip(names, factors, ranks, shorts, strict=True):
        old = adapter.modules[name]
        rank = min(rank, short)
        records.append(
            {
                "name": name,
                "shape": [int(old.b.shape[0]), int(old.a.shape[1])],
                "old_rank": old.rank,
                "rank": rank,
                "energy_kept": f.energy(rank),
                "relative_error": f.relative_error(rank),
                "delta_energy": f.total_energy,
                "top_singular_values": [round(float(s), 8) for s in f.S[:16]],
            }
        )
        if rank == 0:
            # The module leaves the adapter, its bias change with it: PEFT holds a bias only as
            # lora_B.bias, inside the module's LoRA update, so a bias alone is no LoRA module.
            records[-1]["bias_dropped"] = name in adapter.lora_biases
            continue
        a, b = f.lora(rank)
        modules[name] = LoraWeights(a=a.to(old.a.dtype), b=b.to(old.b.dtype), alpha=float(rank))
    pruned = LoraAdapter(
        modules=modules,
        use_rslora=False,
        base_model_name_or_path=adapter.base_model_name_or_path,
        task_type=adapter.task_type,
        modules_to_save=dict(adapter.modules_to_save),
        lora_biases={name: bias for name, bias in adapter.lora_biases.items() if name in modules},
    )
    return pruned, records
