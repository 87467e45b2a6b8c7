"""The name a model is served under, from its `--model` (/v1/models, the page, the logs, the
banner of `treechat up`). Imports no torch: `up` names its nodes' models without loading one."""

from __future__ import annotations

from pathlib import Path

DEFAULT_MODEL = "SmolLM2-135M-Instruct"


def model_name(model: str | None) -> str:
    """The name a model is served under (/v1/models, the page, the logs): a GGUF file's stem
    (`gemma-3-270m-q4_k_m` for /x/gemma-3-270m-q4_k_m.gguf), a local folder's own name, a Hub
    name as given; the default model's name for None. The HTTP gateway's --served-model-name
    adds other names."""
    if model is None:
        return DEFAULT_MODEL
    path = Path(model).expanduser()
    if path.suffix == ".gguf" and path.is_file():
        return path.stem
    if path.is_dir():
        return path.resolve().name or model
    return model
