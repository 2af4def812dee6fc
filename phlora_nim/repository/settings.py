"""How a model repository is generated: :class:`RepositorySettings`, kept in ``phlora_repository.json``
so that later runs (``convert`` again, ``remove``) write the same configs.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from phlora_nim.core.atomic import atomic_write_text
from phlora_nim.core.dtypes import parse_dtype
from phlora_nim.core.errors import InputError, OptionError
from phlora_nim.engines.registry import Engine, engine
from phlora_nim.repository.layout import SETTINGS_FILE


@dataclass(frozen=True)
class RepositorySettings:
    """How a repository is generated; stored in ``phlora_repository.json`` so later runs agree.

    Args:
        backend: the engine (a name in :data:`phlora_nim.engines.registry.ENGINES`; earlier names
            are read as their engine's).
        base: the base checkpoint folder (tokenizer; and the weights for a CPU reference).
        dtype: the engine dtype; LoRA weights are sent and stored in it.
        engine_dir: ``trtllm-legacy``: the engine folder as Triton will see it (``gpt_model_path``).
        tokenizer_dir: tokenizer folder as Triton will see it (default: ``base``).
        max_batch_size: Triton max batch size of every model.
        max_queue_delay_us: dynamic batching delay of the ``tensorrt_llm`` model.
        decoupled: stream tokens (``ModelStreamInfer``) instead of one response per request.
        max_lora_rank: the largest adapter rank the reference model accepts (engines fix theirs
            at build time: ``phlora-nim engine-plan``).
        lora_cache_bytes: host LoRA cache budget; 0 = sized from the registered adapters.
        served_path: where Triton will see this repository (``lora_prefetch_dir`` is set under it);
            default: this folder for a CPU reference, ``/models`` for a GPU engine.
        llm_parameters: more ``tensorrt_llm`` model parameters, written as given.
        trtllm_version: the TensorRT-LLM Triton backend release whose input names are written
            (``0.20``: v0.20.0 and later, ``seed``; ``0.19``: earlier, ``random_seed``).
        lora_prefetch: set ``lora_prefetch_dir`` so the server loads adapters at start. Always
            off for bfloat16: the runtime's npy reader has no bfloat16 (``numpy data type 'V2' not
            supported`` stops the server), so adapters are sent by the router on first use instead.
        engine: ``trtllm-legacy``: the engine's ``config.json`` (kept so later runs size the cache alike).
        prefetch_names: adapters preloaded first (``--prefetch``; only these when no limit is set).
        prefetch_limit: the most adapters preloaded (``--prefetch-limit``); None = all.
        prefetch_usage: request counts per adapter: the most used are preloaded first.
        lora_cache_spare: adapters of the largest kind the caches keep room for besides the
            preloaded ones (sent by the router on misses); None = ``max_batch_size``.
        gpu_free_memory_bytes: free GPU memory when the runtime allocates its LoRA cache (its log:
            ``Using N bytes for LoRA device cache`` at fraction F means N/F free); 0 = unknown.
    """

    backend: str = "trtllm-legacy-cpu"
    base: str = ""
    dtype: str = "float32"
    engine_dir: str | None = None
    tokenizer_dir: str | None = None
    max_batch_size: int = 8
    max_queue_delay_us: int = 2000
    decoupled: bool = False
    max_lora_rank: int = 64
    lora_cache_bytes: int = 0
    served_path: str | None = None
    llm_parameters: dict[str, str] = field(default_factory=dict)
    trtllm_version: str = ""
    lora_prefetch: bool = True
    engine: dict[str, Any] = field(default_factory=dict)
    prefetch_names: tuple[str, ...] = ()
    prefetch_limit: int | None = None
    prefetch_usage: dict[str, float] = field(default_factory=dict)
    lora_cache_spare: int | None = None
    gpu_free_memory_bytes: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "prefetch_names", tuple(self.prefetch_names))
        for flag, value in (("--prefetch-limit", self.prefetch_limit), ("--lora-cache-spare", self.lora_cache_spare)):
            if value is not None and value < 0:
                raise OptionError("must be ≥ 0", where=flag, found=str(value))
        if not parse_dtype(self.dtype, "--engine-dtype").npy_readable:
            object.__setattr__(self, "lora_prefetch", False)
        row = engine(self.backend)  # an unknown name is an OptionError naming the engines there are
        if not row.writes_repository:
            raise OptionError(
                f"{row.name} reads the adapter store any repository holds: no repository is written for it",
                where="--backend",
                found=repr(self.backend),
                fix=f"convert without --backend, then `phlora-nim serve --engine {row.name} --upstream http://HOST:PORT`",
            )
        object.__setattr__(self, "backend", row.name)
        releases = row.triton_releases
        if not self.trtllm_version and releases:
            object.__setattr__(self, "trtllm_version", releases[0])
        if self.trtllm_version and self.trtllm_version not in releases:
            raise OptionError(
                f"unknown TensorRT-LLM release for the Triton configs of {row.name}",
                where="--trtllm-version",
                expected=" or ".join(releases) or "no --trtllm-version for this engine",
                found=repr(self.trtllm_version),
            )
        if self.max_batch_size < 1:
            raise OptionError("max batch size must be ≥ 1", where="--max-batch-size", found=str(self.max_batch_size))
        if self.max_lora_rank < 1:
            raise OptionError("max LoRA rank must be ≥ 1", where="--max-lora-rank", found=str(self.max_lora_rank))
        if self.lora_cache_bytes < 0:
            raise OptionError("LoRA cache size must be ≥ 0", where="--lora-cache-mb", found=str(self.lora_cache_bytes))
        if not self.base:
            raise OptionError("the base checkpoint is required", where="--base", fix="pass --base DIR")

    @property
    def tokenizer(self) -> str:
        return self.tokenizer_dir or self.base

    @property
    def engine_row(self) -> Engine:
        """The engine this repository is generated for (its row of the engine table)."""
        return engine(self.backend)

    def served(self, root: Path) -> str:
        """Where the engine sees the repository: ``served_path``, else this folder (a CPU reference,
        which runs here) or /models."""
        default = str(Path(root).resolve()) if self.engine_row.cpu_reference else "/models"
        return (self.served_path or default).rstrip("/") or "/"

    @classmethod
    def load(cls, root: Path) -> RepositorySettings | None:
        path = Path(root) / SETTINGS_FILE
        if not path.exists():
            return None
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            if "extra" in data:  # what older versions named llm_parameters
                data.setdefault("llm_parameters", data.pop("extra"))
            data.pop("chunked_context", None)  # older versions stored it; it follows ``engine`` now
            return cls(**data)
        except (ValueError, TypeError) as exc:
            raise InputError(
                f"unreadable repository settings ({exc})",
                where=str(path),
                expected="the JSON object phlora-nim convert writes",
                fix="remove it and run `phlora-nim convert` again",
            ) from None

    def save(self, root: Path) -> None:
        atomic_write_text(Path(root) / SETTINGS_FILE, json.dumps(asdict(self), indent=1) + "\n")
