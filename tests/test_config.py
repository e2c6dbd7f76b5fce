import re

import pytest
import torch

from ppcompile.config import PPConfig


@pytest.mark.parametrize("ratio, heads, channels", [(0.4, 6, 896), (0.2, 8, 1216)])
def test_smollm2_kept_counts(ratio, heads, channels):
    # SmolLM2-135M: 30 layers (3 skipped), 9 query heads, MLP 1536.
    # r_l = round(r * 30 / 27, 2): 0.44 / 0.22; heads pruned floor(r_l * 9) = 3 / 1;
    # channels pruned floor(r_l * 1536) = 675 / 337 -> kept 861 / 1199 -> up to 64: 896 / 1216.
    cfg = PPConfig(ratio=ratio)
    assert cfg.kept_heads(9, 30) == heads
    assert cfg.kept_channels(1536, 30) == channels


def test_layer_ratio_scales_for_skipped_layers():
    assert PPConfig(ratio=0.4).layer_ratio(32) == 0.44  # the paper's LLaMA-2-7B example
    assert PPConfig(ratio=0.4, skip_layers=()).layer_ratio(32) == 0.4
    assert PPConfig(ratio=0.0).layer_ratio(32) == 0.0


def test_floors_keep_at_least_one_head_and_one_multiple():
    cfg = PPConfig(ratio=0.9, skip_layers=(0, 1, 2))
    assert re.match(r"ratio 0.9 cannot be reached with 2 of 5 layers pruned: each would prune 225%",
                    cfg.unreachable(5))
    assert cfg.layer_ratio(5) == 1.0 and cfg.kept_heads(4, 5) == 1 and cfg.kept_channels(128, 5) == 64
    assert PPConfig(ratio=0.5, skip_layers=(0, 1, 2)).unreachable(6) is None  # exactly 100%


def test_probe_sizes_have_floors():
    cfg = PPConfig()
    assert cfg.probe_positions(512) == 256 and cfg.probe_positions(3) == 2 and cfg.probe_positions(1) == 1
    assert cfg.probe_samples(8) == 1 and cfg.probe_samples(40) == 2 and cfg.probe_samples(1) == 1


@pytest.mark.parametrize("kw, match", [
    ({"ratio": 1.0}, "ratio"), ({"ratio": -0.1}, "ratio"), ({"policy": "magic"}, "unknown policy"),
    ({"position_ratio": 0.0}, "position_ratio"), ({"sample_ratio": 1.5}, "sample_ratio"),
    ({"blocks": "ffn"}, "blocks"), ({"probe_budget": 0.0}, "probe_budget"), ({"probe_budget": 1.5}, "probe_budget"),
    ({"final_layout": "transposed"}, "final_layout must be one of auto, copy, gather"),
    ({"probe": "top"}, "unknown probe design 'top'"),
])
def test_bad_input_is_a_clear_error(kw, match):
    with pytest.raises(ValueError, match=match):
        PPConfig(**kw)


def test_final_layout_auto_copies_on_cpu_only():
    auto, gather = PPConfig(), PPConfig(final_layout="gather")
    assert auto.copies_final(torch.device("cpu")) and not auto.copies_final(torch.device("cuda"))
    assert PPConfig(final_layout="copy").copies_final(torch.device("cuda"))
    assert not gather.copies_final(torch.device("cpu"))


def test_history_is_used_only_by_a_policy_that_keeps_one_and_only_when_on():
    assert PPConfig().uses_history and not PPConfig(history=False).uses_history
    assert not PPConfig(policy="full-batch").uses_history and not PPConfig(policy="flap").uses_history


def test_options_accept_every_field_and_reject_unknown_keys():
    cfg = PPConfig.from_options({"ratio": 0.2, "policy": "full-batch", "skip_layers": [1, 0]})
    assert (cfg.ratio, str(cfg.policy), cfg.skip_layers) == (0.2, "full-batch", (0, 1))
    with pytest.raises(ValueError, match="unknown ppcompile option"):
        PPConfig.from_options({"ratoi": 0.2})


@pytest.mark.parametrize("kw, error, match", [
    ({"ratio": "0.4"}, TypeError,
     r"ratio must be a number in \[0, 1\), got '0.4' \(str\): pass a float, e.g. ratio=0.4"),
    ({"ratio": True}, TypeError, r"ratio must be a number in \[0, 1\), got True \(bool\)"),
    ({"ratio": None}, TypeError, r"ratio must be a number in \[0, 1\), got None \(NoneType\)"),
    ({"ratio": float("nan")}, ValueError, r"ratio must be a number in \[0, 1\), got nan"),
    ({"ratio": 1.5}, ValueError, r"ratio must be a number in \[0, 1\), got 1.5: it is the fraction pruned"),
    ({"position_ratio": "half"}, TypeError, r"position_ratio must be a number in \(0, 1\], got 'half' \(str\)"),
    ({"sample_ratio": [0.1]}, TypeError, r"sample_ratio must be a number in \(0, 1\], got \[0.1\] \(list\)"),
    ({"momentum": "0.9"}, TypeError, r"momentum must be a number in \[0, 1\), got '0.9' \(str\)"),
    ({"momentum": 1.0}, ValueError, r"momentum must be a number in \[0, 1\), got 1.0"),
    ({"skip_layers": "012"}, TypeError,
     r"skip_layers must be an iterable of layer indices \(ints\), got '012' \(str\): e.g. skip_layers=\(0, 1, 2\)"),
    ({"skip_layers": 3}, TypeError, r"skip_layers must be an iterable of layer indices \(ints\), got 3 \(int\)"),
    ({"skip_layers": (0, 1.0)}, TypeError, r"skip_layers must hold layer indices \(ints\), got 1.0 \(float\) in it"),
    ({"skip_layers": (0, True)}, TypeError, r"skip_layers must hold layer indices \(ints\), got True \(bool\)"),
    ({"skip_layers": (-1,)}, ValueError, r"skip_layers must hold layer indices >= 0, got \[-1\]"),
    ({"mlp_multiple": 64.0}, TypeError, r"mlp_multiple must be an int >= 1, got 64.0 \(float\): e.g. mlp_multiple=64"),
    ({"mlp_multiple": 0}, ValueError, r"mlp_multiple must be an int >= 1, got 0"),
    ({"cache_bucket": 0}, ValueError, r"cache_bucket must be an int >= 1, got 0"),
    ({"shards": 1.5}, TypeError, r"shards must be an int >= 1, got 1.5 \(float\): e.g. shards=2"),
    ({"cache_bucket": 12.5}, TypeError, r"cache_bucket must be an int >= 1, got 12.5 \(float\): e.g. cache_bucket=128"),
    ({"strict": "False"}, TypeError, r"strict must be True or False, got 'False' \(str\): pass a bool"),
    ({"history": "off"}, TypeError, r"history must be True or False, got 'off' \(str\): pass a bool"),
    ({"dynamic": "auto"}, TypeError, r"dynamic must be None, True or False, got 'auto' \(str\): None compiles"),
    ({"dynamic": 1}, TypeError, r"dynamic must be None, True or False, got 1 \(int\)"),
])
def test_wrong_types_and_values_name_the_field_and_what_it_got(kw, error, match):
    with pytest.raises(error, match=match):
        PPConfig(**kw)


def test_numbers_of_other_types_are_accepted_as_python_numbers():
    np = pytest.importorskip("numpy")
    import torch
    cfg = PPConfig(ratio=np.float64(0.25), momentum=0, skip_layers=torch.tensor([2, 0, 2]), mlp_multiple=np.int64(32))
    assert (cfg.ratio, cfg.momentum, cfg.skip_layers, cfg.mlp_multiple) == (0.25, 0.0, (0, 2), 32)
    assert type(cfg.ratio) is float and all(type(i) is int for i in cfg.skip_layers) and type(cfg.mlp_multiple) is int


def test_check_layers_refuses_layers_the_model_does_not_have():
    with pytest.raises(ValueError, match=re.escape("skip_layers names layer(s) [40] but the model has 30 decoder "
                                                   "layers (0..29): drop them from skip_layers")):
        PPConfig(skip_layers=(0, 1, 40)).check_layers(30)
    with pytest.raises(ValueError, match=re.escape("names layer(s) [4, 5]")):
        PPConfig(skip_layers=(5, 4, 0)).check_layers(4)
    PPConfig(skip_layers=(0, 1, 29)).check_layers(30)


def test_check_layers_refuses_skipping_every_layer_at_a_positive_ratio():
    with pytest.raises(ValueError, match=re.escape("skip_layers skips all 4 layers, so nothing would be pruned at "
                                                   "ratio 0.4: skip fewer layers or use ratio 0")):
        PPConfig(ratio=0.4, skip_layers=range(4)).check_layers(4)
    PPConfig(ratio=0.0, skip_layers=range(4)).check_layers(4)  # nothing asked, nothing pruned: fine
    PPConfig(policy="dense", skip_layers=range(4)).check_layers(4)  # dense prunes nothing anyway
    PPConfig(ratio=0.4, skip_layers=range(3)).check_layers(4)


def test_shards_keep_in_each_group_what_a_block_of_its_size_keeps():
    cfg = PPConfig(ratio=0.4, skip_layers=(), shards=3, mlp_multiple=16)  # SmolLM2's 9 heads over 3 shards
    assert cfg.kept_units("attention", 9, 30) == 3 * cfg.kept_heads(3, 30) == 3 * 2
    assert cfg.kept_units("mlp", 1536, 30) == 3 * cfg.kept_channels(512, 30) == 3 * 320
    assert PPConfig(ratio=0.4, skip_layers=()).kept_units("attention", 9, 30) == 6  # no shards: the block's rule
