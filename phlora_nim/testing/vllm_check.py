"""Do the adapters phlora-nim writes serve the same under the real vLLM engine as under PEFT?

The check, shared by ``tests/test_vllm_engine.py`` and ``bench/vllm_multi_lora.py``:

1. a base model and a fine-tune of it (:func:`perturbed_finetune` for real weights, where a full
   fine-tune is too slow for a test);
2. adapters written as a user would, with the CLI (:func:`write_adapters`): uniform ``--rank``,
   ``--energy`` (mixed ranks), ``--budget-params``, the NIM store folder of ``export --format nim``,
   and a deliberately mis-scaled copy (``lora_alpha`` doubled) that a working check must catch;
3. greedy tokens from PEFT in this interpreter (:func:`peft_greedy`) and from vLLM in its own
   environment (:func:`run_vllm`, which runs ``vllm_driver.py`` under ``.venv-vllm``).

vLLM (0.32) accepts a PEFT folder when ``r ≤ max_lora_rank`` (one of 1, 8, 16, 32, 64, 128, 256,
320, 512; ``vllm/config/lora.py``, ``LoRAConfig``), without DoRA, LoRA bias or ``modules_to_save``
(``vllm/lora/peft_helper.py``, ``PEFTHelper.validate_legal``), and scales each module by
``lora_alpha / r`` (``PEFTHelper.get_rank_and_scaling``; since 0.2x it also honours
``rank_pattern``/``alpha_pattern``, which earlier releases dropped: phlora-nim's folders have no
patterns, so every release reads them alike).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

# Plain prompts for SmolLM2 (no chat template), shared by the vLLM tests and bench/vllm_multi_lora.py.
SMOLLM2_PROMPTS = (
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time",
    "The three primary colors are",
    "To make a cup of tea, first",
    "The largest planet in the solar system",
    "Water boils at",
    "My favourite book is",
)

ROOT = Path(__file__).resolve().parents[2]
VLLM_VENV = ROOT / ".venv-vllm"
SETUP_COMMAND = "bash tests/setup_vllm_env.sh"
DRIVER = Path(__file__).with_name("vllm_driver.py")
READY_MARKER = ".phlora-ready"


def vllm_python() -> Path | None:
    """The vLLM environment's interpreter (``PHLORA_VLLM_PYTHON`` or ``.venv-vllm``), if set up."""
    env = os.environ.get("PHLORA_VLLM_PYTHON")
    if env:
        return Path(env) if Path(env).is_file() else None
    python = VLLM_VENV / "bin" / "python"
    return python if python.is_file() and (VLLM_VENV / READY_MARKER).is_file() else None


# --------------------------------------------------------------------------- fine-tunes


def perturbed_finetune(
    base: Path,
    out: Path,
    *,
    strength: float = 0.08,
    seed: int = 0,
    decay: dict[str, float] | None = None,
) -> Path:
    """A stand-in fine-tune of ``base``: every decoder linear weight in ``decay`` gets a low-rank delta.

    ΔW = strength · ‖W‖_F · U diag(s) Vᵀ / ‖s‖ with random orthonormal U, V and s_i = exp(−i/τ) over
    48 directions, τ per module kind: fast decay on some modules, slow on others, so ``--energy``
    picks visibly different ranks per module. Everything else (embeddings, norms) is the base's.
    """
    from safetensors.torch import load_file, save_file

    decay = decay or {"q_proj": 2.0, "v_proj": 4.0, "o_proj": 8.0, "up_proj": 3.0, "down_proj": 16.0}
    gen = torch.Generator().manual_seed(seed)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(base, tmp, ignore=shutil.ignore_patterns("*.safetensors", "*.bin", "*.index.json"))
    state = load_file(str(base / "model.safetensors"))
    for name, weight in state.items():
        kind = name.split(".")[-2]
        if kind not in decay or ".layers." not in name or weight.dim() != 2:
            continue
        w = weight.float()
        k = min(48, *w.shape)
        u, _ = torch.linalg.qr(torch.randn(w.shape[0], k, generator=gen))
        v, _ = torch.linalg.qr(torch.randn(w.shape[1], k, generator=gen))
        s = torch.exp(-torch.arange(k, dtype=torch.float32) / decay[kind])
        delta = (u * (s / s.norm())) @ v.T
        state[name] = (w + strength * w.norm() * delta).to(weight.dtype).contiguous()
    save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out


# --------------------------------------------------------------------------- adapters, as a user writes them


def cli(*args: str | Path) -> None:
    """Run ``phlora-nim ARGS`` in this process; a non-zero exit raises."""
    from phlora_nim.cli.main import main

    try:
        main([str(a) for a in args])
    except SystemExit as exc:
        if exc.code not in (0, None):
            raise RuntimeError(f"phlora-nim {' '.join(map(str, args))} exited with {exc.code}") from exc


def misscaled_copy(adapter: Path, out: Path, factor: float = 2.0) -> Path:
    """``adapter`` with ``lora_alpha`` multiplied by ``factor``: the same tensors applied ``factor``× too strong."""
    shutil.rmtree(out, ignore_errors=True)
    shutil.copytree(adapter, out)
    config_path = out / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config["lora_alpha"] = config["lora_alpha"] * factor
    config_path.write_text(json.dumps(config, indent=2) + "\n")
    return out


def write_adapters(base: Path, finetuned: Path, root: Path, *, budget_params: int) -> dict[str, Path]:
    """The adapter folders the check serves, by name (``misscaled`` is the control that must fail)."""
    common = ["--base", base, "--finetuned", finetuned, "--no-plot", "--force"]
    cli("extract", *common, "--out", root / "rank16", "--rank", "16")
    cli("extract", *common, "--out", root / "energy", "--energy", "0.5", "--max-rank", "64")
    cli("extract", *common, "--out", root / "budget", "--budget-params", str(budget_params), "--max-rank", "64")
    cli("export", root / "rank16", "--format", "nim", "--out", root / "nim-store", "--name", "support", "--force")
    return {
        "rank16": root / "rank16",
        "energy": root / "energy",
        "budget": root / "budget",
        "nim-store": root / "nim-store" / "support",
        "misscaled": misscaled_copy(root / "rank16", root / "misscaled"),
    }


def module_ranks(adapter: Path) -> list[int]:
    """True per-module ranks of an extracted adapter (from its report; the folder is padded to the largest)."""
    modules = json.loads((adapter / "phlora_report.json").read_text())["modules"]
    return sorted({m["rank"] for m in modules if m.get("rank")})  # rank 0: a module the fine-tune left alone


# --------------------------------------------------------------------------- PEFT, the reference


@torch.no_grad()
def greedy_tokens(model: Any, prompts: Sequence[list[int]], max_new_tokens: int) -> list[list[int]]:
    """Exactly ``max_new_tokens`` greedy tokens per prompt (end tokens not special).

    Prompts of equal length run as one batch (no padding, so no attention mask to differ from an engine's).
    """
    import inspect

    from transformers import DynamicCache

    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    # transformers 5.2x renamed the cache argument ``past_key_values`` → ``cache``; a DynamicCache fills in place.
    key = "cache" if "cache" in inspect.signature(inner.forward).parameters else "past_key_values"
    outs: dict[int, list[int]] = {}
    for length in sorted({len(p) for p in prompts}):
        rows = [i for i, p in enumerate(prompts) if len(p) == length]
        cache = DynamicCache()
        logits = model(input_ids=torch.tensor([prompts[i] for i in rows]), use_cache=True, **{key: cache}).logits
        tokens = [logits[:, -1].argmax(-1)]
        while len(tokens) < max_new_tokens:
            logits = model(input_ids=tokens[-1][:, None], use_cache=True, **{key: cache}).logits
            tokens.append(logits[:, -1].argmax(-1))
        for j, i in enumerate(rows):
            outs[i] = [int(t[j]) for t in tokens]
    return [outs[i] for i in range(len(prompts))]


def peft_greedy(
    base: Path, adapters: dict[str, Path], prompts: Sequence[list[int]], max_new_tokens: int
) -> dict[str, list[list[int]]]:
    """Greedy tokens of the base model (``base``) and of each adapter applied by PEFT, as users load them."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    # One thread: small batches gain little from two, and OpenMP threads spinning on a shared or
    # oversubscribed machine (pytest -n 2) made each SmolLM2 forward 30× slower (7.7 s vs 0.23 s measured).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
        tokens = {"base": greedy_tokens(model, prompts, max_new_tokens)}
        for name, folder in adapters.items():
            peft_model = PeftModel.from_pretrained(model, str(folder)).eval()
            tokens[name] = greedy_tokens(peft_model, prompts, max_new_tokens)
            model = peft_model.unload()  # the base modules back, unmerged, for the next adapter
    finally:
        torch.set_num_threads(threads)
    return tokens


# --------------------------------------------------------------------------- vLLM, in its own environment


def run_vllm(
    spec: dict[str, Any], workdir: Path, *, timeout: float = 900, threads: int | None = None
) -> dict[str, Any]:
    """Run ``vllm_driver.py`` on ``spec`` under the vLLM environment; its JSON result."""
    python = vllm_python()
    if python is None:
        raise RuntimeError(f"the vLLM environment is not set up: run `{SETUP_COMMAND}`")
    workdir.mkdir(parents=True, exist_ok=True)
    spec_path, out_path, log_path = workdir / "spec.json", workdir / "result.json", workdir / "vllm.log"
    spec = {"server_log": str(workdir / "server.log"), **spec}
    spec_path.write_text(json.dumps(spec, indent=1, default=str))
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1")}
    # vLLM caps torch at one thread below this count ("Reducing Torch threads … for serving").
    env.setdefault("OMP_NUM_THREADS", str(threads or os.cpu_count() or 1))
    env.pop("PYTHONPATH", None)  # nothing of this environment's packages may shadow vLLM's
    with log_path.open("wb") as log:
        proc = subprocess.run(
            [str(python), str(DRIVER), str(spec_path), str(out_path)],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            timeout=timeout,
            check=False,
        )
    if proc.returncode != 0 or not out_path.is_file():
        tail = log_path.read_text(errors="replace")[-4000:]
        raise RuntimeError(f"vLLM driver exited with {proc.returncode}; end of {log_path}:\n{tail}")
    return json.loads(out_path.read_text())


def engine_options(*, max_model_len: int, max_loras: int, max_lora_rank: int = 64) -> dict[str, Any]:
    """``vllm.LLM`` keyword arguments for a CPU check: float32 like PEFT, eager (no compile wait)."""
    return {
        "dtype": "float32",
        "enable_lora": True,
        "max_lora_rank": max_lora_rank,
        "max_loras": max_loras,
        "max_cpu_loras": max_loras,
        "max_model_len": max_model_len,
        "enforce_eager": True,
        "seed": 0,
    }


def agreement(got: dict[str, list[list[int]]], want: dict[str, list[list[int]]], name: str) -> int:
    """How many prompts ``name`` answered token-identically in ``got`` and ``want``."""
    return sum(g == w for g, w in zip(got[name], want[name], strict=True))
