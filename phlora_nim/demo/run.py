"""The one-command demo: fine-tunes → adapters → real Triton (CPU) → router → per-request adapters.

1. a small Llama with its tokenizer, and three full fine-tunes of it, each taught its own rule;
2. ``convert --backend trtllm-cpu``: every fine-tune becomes a LoRA adapter (a PEFT folder in the
   repository's store) for TensorRT-LLM's ``llmapi`` Triton model, with its ``model.yaml``;
3. the real ``tritonserver`` (phlora-nim's CPU reference of the ``llmapi`` model, which reads each
   adapter from its path as TensorRT-LLM does) and the router start, with its OpenAI-compatible HTTP API;
4. requests for every adapter and the base model go through the router, mixed and concurrent, each
   selecting its adapter by model name: first with the ``openai`` SDK (``/v1/completions``), then
   with a Triton gRPC client;
5. a table compares each answer with the fine-tuned model's own output (run directly in PyTorch).
Everything started is stopped at the end.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from phlora_nim.core.outputs import OutputKind, guard_output

log = logging.getLogger("phlora_nim.demo.run")

PROMPTS = ("the red cat", "one small bird", "king queen knight")
NAMES = ("stride-11", "stride-17", "stride-23")
NEW_TOKENS = 6
DEMO_ENGINE = "trtllm-cpu"  # the CPU reference of TensorRT-LLM's llmapi Triton model
BASE_MODEL = "tensorrt_llm"  # the Triton model: the base when called by its own name

DEMO_OUTPUT = OutputKind("demo", ("checkpoints",), ("checkpoints", "model_repository"))


@dataclass(frozen=True)
class DemoRow:
    """One request of the demo and how it compares with the model it stands for."""

    path: str  # "OpenAI API" or "Triton gRPC"
    model: str
    prompt: str
    output: str
    expected: str
    rank: str
    energy: str

    @property
    def match(self) -> bool:
        return self.output == self.expected


def _reference_outputs(checkpoint: Path, tokenizer: Any, prompts: tuple[str, ...]) -> list[str]:
    """Greedy continuation by the checkpoint itself, in PyTorch: what the served adapter should say."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(checkpoint, attn_implementation="eager").eval()
    texts = []
    for prompt in prompts:
        ids = tokenizer.encode(prompt, add_special_tokens=True)  # as the llmapi model tokenizes text_input
        with torch.no_grad():
            out = model.generate(
                torch.tensor([ids]),
                max_new_tokens=NEW_TOKENS,
                do_sample=False,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
            )
        texts.append(tokenizer.decode(out[0, len(ids) :].tolist(), skip_special_tokens=True))
    return texts


def _ask_openai(base_url: str, model: str, prompt: str) -> str:
    """The OpenAI path: any OpenAI SDK client, the adapter named by ``model``."""
    import openai

    client = openai.OpenAI(base_url=base_url, api_key="none", max_retries=0, timeout=120)
    out = client.completions.create(model=model, prompt=prompt, max_tokens=NEW_TOKENS, temperature=0)
    return out.choices[0].text


def _ask(address: str, model: str, prompt: str) -> str:
    import tritonclient.grpc as grpcclient

    with grpcclient.InferenceServerClient(address) as client:
        text = grpcclient.InferInput("text_input", [1], "BYTES")
        text.set_data_from_numpy(np.array([prompt.encode()], dtype=object))
        max_tokens = grpcclient.InferInput("sampling_param_max_tokens", [1], "INT32")
        max_tokens.set_data_from_numpy(np.array([NEW_TOKENS], dtype=np.int32))
        result = client.infer(model, [text, max_tokens], client_timeout=120)
        return result.as_numpy("text_output").reshape(-1)[0].decode()


@contextmanager
def _step(progress: Progress, text: str) -> Iterator[None]:
    task = progress.add_task(text, total=None)
    try:
        yield
    finally:
        progress.update(task, visible=False)
        progress.console.print(f"[green]✓[/] {text}")


def run_demo(
    out: Path,
    *,
    steps: int = 40,
    energy: float = 0.99,
    console: Console | None = None,
) -> list[DemoRow]:
    """Run the whole pipeline on an embedded default; returns the table's rows.

    Args:
        out: working folder (replaced).
        steps: full fine-tuning steps per checkpoint.
        energy: energy policy of the extraction (share of each module's delta kept).
    """
    from transformers import AutoTokenizer

    from phlora_nim.demo.toy_models import make_finetunes

    _quiet_transformers()
    console = console or Console()
    out = Path(out)
    # Replaced each run, so only a folder an earlier demo made (or an empty one) is taken.
    guard_output(out, force=True, kind=DEMO_OUTPUT, flag="demo --out")
    if out.exists():
        shutil.rmtree(out)
    columns = (SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn())
    with Progress(*columns, console=console, transient=True) as progress:
        with _step(progress, f"base model + {len(NAMES)} full fine-tunes ({steps} AdamW steps each, CPU)"):
            base, fts = make_finetunes("llama", out / "checkpoints", len(NAMES), steps=steps, linear_only=True)
        repo = out / "model_repository"
        with _step(progress, f"convert → {repo} (PHLoRA, energy ≥ {energy:g} per module)"):
            converted = _convert(base, fts, repo, energy)
        tokenizer = AutoTokenizer.from_pretrained(base)
        with _step(progress, "reference outputs of each fine-tuned model, in PyTorch"):
            expected = {BASE_MODEL: _reference_outputs(base, tokenizer, PROMPTS)}
            for name, ft in zip(NAMES, fts, strict=True):
                expected[name] = _reference_outputs(ft, tokenizer, PROMPTS)
        asked = _ask_through_the_router(progress, repo, Path(base).name)
    rows = [_row(path, model, prompt, answer, converted, expected) for (path, model, prompt), answer in asked]
    _print_table(console, rows, repo)
    return rows


def _quiet_transformers() -> None:
    import warnings

    import transformers

    warnings.filterwarnings("ignore", category=FutureWarning)
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()


def _convert(base: Path, fts: list[Path], repo: Path, energy: float) -> dict[str, Any]:
    """``convert --backend trtllm-cpu`` every fine-tune into one repository; results by adapter name."""
    from phlora_nim.converters.extract import ExtractOptions
    from phlora_nim.converters.rank_policy import RankPolicy
    from phlora_nim.jobs.convert import ConvertJob, convert
    from phlora_nim.repository.settings import RepositorySettings

    job = ConvertJob(
        base=base,
        finetuned=tuple(fts),
        names=NAMES,
        repository=repo,
        options=ExtractOptions(policy=RankPolicy(energy=energy, max_rank=64)),
        settings=RepositorySettings(backend=DEMO_ENGINE, base=str(base)),
    )
    return {c.entry.name: c for c in convert(job, command="phlora-nim demo")}


def _ask_through_the_router(progress: Progress, repo: Path, base_name: str) -> list[tuple[tuple[str, str, str], str]]:
    """Start Triton and the router, send every (path, model, prompt) concurrently; pairs it with its answer.

    The OpenAI API names the base model after its checkpoint folder (``base_name``); gRPC calls it "tensorrt_llm".
    """
    from phlora_nim.router.config import ANY_FREE_PORT, RouterConfig
    from phlora_nim.router.server import RouterThread
    from phlora_nim.triton.launcher import LocalTriton

    with _step(progress, "start tritonserver (CPU) and the router (gRPC + OpenAI API)"):
        triton = LocalTriton(repo).start()
    try:
        config = RouterConfig(
            model_repository=repo,
            upstreams=(triton.grpc_url,),
            port=0,
            metrics_port=0,
            http_port=ANY_FREE_PORT,
            upstream_model=BASE_MODEL,
        )
        with RouterThread(config) as router:
            url = router.http_url or ""
            paths = {
                "OpenAI API": (base_name, lambda m, p: _ask_openai(url, m, p)),
                "Triton gRPC": (BASE_MODEL, lambda m, p: _ask(router.address, m, p)),
            }
            asked = []
            for path, (base_model, ask) in paths.items():
                batch = [(path, m, p) for p in PROMPTS for m in (base_model, *NAMES)]
                described = f"{len(batch)} requests through the router's {path}, mixed and concurrent"
                with _step(progress, described), ThreadPoolExecutor(len(batch)) as pool:
                    asked += zip(batch, pool.map(lambda job, ask=ask: ask(job[1], job[2]), batch), strict=True)
            progress.console.print(f"OpenAI API of the router: {url} (the same requests with curl or the openai SDK)")
    finally:
        triton.stop()
    return asked


def _row(
    path: str, model: str, prompt: str, answer: str, converted: dict[str, Any], expected: dict[str, list[str]]
) -> DemoRow:
    c = converted.get(model)
    ranks = sorted(set(c.entry.ranks.values())) if c else []
    return DemoRow(
        path=path,
        model=model if c else "base (no adapter)",
        prompt=prompt,
        output=answer,
        expected=expected[model if c else BASE_MODEL][PROMPTS.index(prompt)],
        rank=(f"{ranks[0]}–{ranks[-1]}" if len(ranks) > 1 else str(ranks[0])) if ranks else "–",
        energy=f"{c.report.totals['energy_kept_linear']:.4f}" if c else "–",
    )


def _print_table(console: Console, rows: list[DemoRow], repo: Path) -> None:
    table = Table(title="one base model on Triton, an adapter per request (through the router)")
    for col in ("path", "model", "rank", "energy kept", "prompt", "output via Triton", "matches its own model"):
        table.add_column(col)
    for r in rows:
        table.add_row(r.path, r.model, r.rank, r.energy, r.prompt, r.output, "[green]yes" if r.match else "[red]no")
    console.print(table)
    matched = sum(r.match for r in rows)
    console.print(
        f"{matched}/{len(rows)} answers equal the output of the fine-tuned model they stand for. "
        f"Repository: {repo} (serve it: phlora-nim triton -m {repo})"
    )
