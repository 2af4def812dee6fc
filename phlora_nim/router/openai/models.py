"""What the HTTP front knows of the models it serves: the ``/v1/models`` list, tokenizers, prompt limits.

Everything comes from the model repository the router already watches (the registry, each adapter's
store folder with its report and, when its fine-tune shipped them, tokenizer files; the base
tokenizer copied by ``convert``; ``phlora_repository.json``), so every router replica gives the
same answer and adapters appear and disappear with ``convert`` / ``remove`` without a restart.
Server paths never reach clients: a source fine-tune is named by its folder's name.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from phlora_nim.core.errors import PhloraError
from phlora_nim.repository.layout import SETTINGS_FILE, adapter_store_dir, base_tokenizer_dir
from phlora_nim.repository.registry import AdapterEntry
from phlora_nim.router.catalog import AdapterCatalog
from phlora_nim.router.errors import RequestError
from phlora_nim.router.openai.tokenizer import TextTokenizer
from phlora_nim.router.replicas import ModelInfo
from phlora_nim.router.tenants import Tenant
from phlora_nim.triton.limits import DEFAULT_MAX_INPUT_LEN

log = logging.getLogger("phlora_nim.router")


def _timestamp(iso: str) -> int:
    try:
        return int(dt.datetime.fromisoformat(iso).timestamp())
    except ValueError:
        return 0


def _json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


@dataclass(frozen=True)
class Limits:
    """Prompt and sequence limits of the engine (None: unknown, the engine checks them itself)."""

    max_input_len: int | None
    max_seq_len: int | None


class ModelDirectory:
    """The base model and adapters as the OpenAI API shows them, and their tokenizers.

    Args:
        root: the model repository.
        catalog: the router's adapter catalogue (refreshed by the router).
        served_model_name: the base model's id (default: its checkpoint folder's name).
    """

    def __init__(self, root: Path, catalog: AdapterCatalog, *, served_model_name: str | None = None) -> None:
        self.root = Path(root)
        self.catalog = catalog
        self.settings = _json(self.root / SETTINGS_FILE)
        base = str(self.settings.get("base") or "")
        self.base_model = served_model_name or Path(base).name or "base"
        self._tokenizers: dict[tuple[str, int], TextTokenizer] = {}
        self._reports: dict[tuple[str, int], dict[str, Any]] = {}

    # tokenizers ------------------------------------------------------------------------------
    def _base_folders(self) -> list[Path]:
        folders = [base_tokenizer_dir(self.root)]
        for key in ("tokenizer_dir", "base"):
            if self.settings.get(key):
                folders.append(Path(str(self.settings[key])))
        return folders

    def _load(self, folder: Path) -> TextTokenizer | None:
        path = folder / "tokenizer.json"
        try:
            stamp = path.stat().st_mtime_ns
        except OSError:
            return None
        key = (str(folder), stamp)
        if key not in self._tokenizers:
            try:
                self._tokenizers[key] = TextTokenizer.load(folder)
            except PhloraError as exc:
                log.warning("tokenizer not usable: %s", exc)
                return None
        return self._tokenizers[key]

    def base_tokenizer(self) -> TextTokenizer:
        """The base checkpoint's tokenizer.

        Raises:
            RequestError: FAILED_PRECONDITION when the repository has none the router can read.
        """
        for folder in self._base_folders():
            tokenizer = self._load(folder)
            if tokenizer is not None:
                return tokenizer
        raise RequestError(
            grpc.StatusCode.FAILED_PRECONDITION,
            "the router has no tokenizer for the base model: run `phlora-nim convert` again (it copies the "
            "base checkpoint's tokenizer.json into the repository)",
        )

    def tokenizer(self, entry: AdapterEntry | None) -> TextTokenizer:
        """The adapter's own tokenizer when its fine-tune shipped one, else the base model's."""
        if entry is not None:
            own = self._load(adapter_store_dir(self.root, entry.name))
            if own is not None:
                return own
        return self.base_tokenizer()

    def chat_template(self, entry: AdapterEntry | None) -> str | None:
        """The adapter's own chat template when its fine-tune shipped one, else the base model's."""
        own = self.tokenizer(entry).chat_template
        return own if own is not None else self.base_tokenizer().chat_template

    # limits ----------------------------------------------------------------------------------
    def limits(self, info: ModelInfo) -> Limits:
        """``max_input_len`` / ``max_seq_len`` from the engine model's parameters, else as the CPU
        reference model derives them (TensorRT-LLM's build defaults capped by the base's context)."""
        params = dict(info.parameters)
        context = _json(Path(str(self.settings.get("base") or "")) / "config.json").get("max_position_embeddings")
        seq = int(params.get("max_seq_len") or 0) or (int(context) if isinstance(context, int) else None)
        inp = int(params.get("max_input_len") or 0) or (min(DEFAULT_MAX_INPUT_LEN, seq - 1) if seq else None)
        return Limits(max_input_len=inp, max_seq_len=seq)

    # listing ---------------------------------------------------------------------------------
    def _report(self, entry: AdapterEntry) -> dict[str, Any]:
        key = (entry.name, entry.task_id)
        if key not in self._reports:
            totals = _json(adapter_store_dir(self.root, entry.name) / "phlora_report.json").get("totals", {})
            self._reports[key] = totals if isinstance(totals, dict) else {}
        return self._reports[key]

    def _adapter_card(self, entry: AdapterEntry) -> dict[str, Any]:
        totals = self._report(entry)
        source = entry.sources.get("finetuned", "")
        return {
            "id": entry.name,
            "object": "model",
            "created": _timestamp(entry.created),
            "owned_by": "phlora-nim",
            "root": entry.name,
            "parent": self.base_model,
            "phlora": {
                "rank": entry.max_rank,
                "min_rank": min(entry.ranks.values(), default=0),
                "parameters": totals.get("adapter_parameters"),
                "energy_kept": totals.get("energy_kept_total"),
                "energy_kept_linear": totals.get("energy_kept_linear"),
                "modules": len(entry.modules),
                "dtype": entry.dtype,
                "source_finetune": Path(source).name if source else None,
                "registered": entry.created,
                "lora_task_id": entry.task_id,
            },
        }

    def cards(self, tenant: Tenant | None, *, max_model_len: int | None) -> list[dict[str, Any]]:
        """``/v1/models``: the base model, then every adapter ``tenant`` may use, by name."""
        adapters = [e for n, e in sorted(self.catalog.adapters.items()) if tenant is None or tenant.allows_adapter(n)]
        cards = []
        if tenant is None or tenant.allows_base_model(self.base_model):
            created = min((_timestamp(e.created) for e in self.catalog.adapters.values()), default=0)
            base = {"id": self.base_model, "object": "model", "created": created, "owned_by": "phlora-nim"}
            base.update(root=self.base_model, parent=None, max_model_len=max_model_len)
            cards.append(base)
        cards.extend(self._adapter_card(e) for e in adapters)
        return cards
