import re

import pytest

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
    ({"blocks": "ffn"}, "blocks"),
])
def test_bad_input_is_a_clear_error(kw, match):
    with pytest.raises(ValueError, match=match):
        PPConfig(**kw)


def test_options_accept_every_field_and_reject_unknown_keys():
    cfg = PPConfig.from_options({"ratio": 0.2, "policy": "full-batch", "skip_layers": [1, 0]})
    assert (cfg.ratio, cfg.policy, cfg.skip_layers) == (0.2, "full-batch", (0, 1))
    with pytest.raises(ValueError, match="unknown ppcompile option"):
        PPConfig.from_options({"ratoi": 0.2})
