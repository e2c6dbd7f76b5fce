"""demo.verdict: each sentence follows from the figures it is given, either way."""
from ppcompile.demo import verdict


def _figures(pp_ppl, flap_ppl, pp_tok_s, pp_prefill):
    quality = {"dense": {"ppl": 40.0}, "pp": {"ppl": pp_ppl}, "flap": {"ppl": flap_ppl}}
    speed = {"dense": {"decode_tok_s": 100.0, "prefill_s": 0.5}, "pp": {"decode_tok_s": pp_tok_s, "prefill_s": pp_prefill}}
    return quality, speed


def test_where_pp_wins_it_says_so_with_the_ratios():
    q, s = _figures(pp_ppl=100.0, flap_ppl=150.0, pp_tok_s=120.0, pp_prefill=0.4)
    quality, decode, prefill = verdict(q, s, 0.4)
    assert "1.50x lower than the static baseline's" in quality
    assert "1.20x dense's tokens/s: faster" in decode
    assert "0.80x dense's time: faster" in prefill


def test_where_pp_loses_it_says_so():
    q, s = _figures(pp_ppl=160.0, flap_ppl=150.0, pp_tok_s=90.0, pp_prefill=0.55)
    quality, decode, prefill = verdict(q, s, 0.4)
    assert "no better than the static baseline's" in quality
    assert "0.90x dense's tokens/s: not faster here" in decode
    assert "1.10x dense's time: slower" in prefill and "pruning 40% saves" in prefill
