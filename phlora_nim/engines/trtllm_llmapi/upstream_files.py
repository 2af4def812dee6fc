"""Where NVIDIA's ``model.py`` / ``helpers.py`` of the ``llmapi`` model come from (never from phlora-nim).

They must be the ones of the TensorRT-LLM release inside the serving container. The
``tritonserver:<yy.mm>-trtllm-python-py3`` images do not ship the model repository; Triton's guide
("Deploying an LLM with Triton and TRT-LLM", tutorials for 26.x) clones the TensorRT-LLM tag matching
the container's ``tensorrt_llm`` version and takes ``triton_backend/all_models/llmapi/``. ``convert``
prints these steps; the Helm chart runs them in an init container of the serving image.
"""

from __future__ import annotations

REPO_URL = "https://github.com/NVIDIA/TensorRT-LLM.git"
MODEL_DIR = "triton_backend/all_models/llmapi/tensorrt_llm/1"
FILES = ("model.py", "helpers.py")
# The installed package's version, read without importing it (importing tensorrt_llm initialises CUDA).
VERSION_COMMAND = "python3 -c \"from importlib.metadata import version; print(version('tensorrt_llm'))\""


def fetch_script(dest: str) -> str:
    """Shell lines that put the two files into ``dest`` (the ``tensorrt_llm/1`` folder), run in the serving image."""
    files = " ".join(f"/tmp/trtllm/{MODEL_DIR}/{f}" for f in FILES)
    return (
        f"set -e; TRTLLM_VERSION=$({VERSION_COMMAND}); "
        f'git clone --depth 1 --branch "v${{TRTLLM_VERSION}}" {REPO_URL} /tmp/trtllm; '
        f'mkdir -p "{dest}"; cp {files} "{dest}/"'
    )


def instructions(version_dir: str) -> list[str]:
    """The lines ``convert --backend trtllm`` ends with."""
    return [
        f"NVIDIA's model.py and helpers.py are not written by phlora-nim; put them into {version_dir}/ from the",
        "TensorRT-LLM release inside your tritonserver:<yy.mm>-trtllm-python-py3 container, e.g. in that container:",
        f"  {fetch_script(version_dir)}",
        "(the Helm chart does this in an init container of the serving image).",
    ]
