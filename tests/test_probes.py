"""Probe designs end to end: each picks the tokens a by-hand computation gives, runs the block on
them at their true positions, and fuses with the history as probes.py says."""
import pytest
import torch
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

import ppcompile as pp
from ppcompile import ops, probes
from ppcompile.models import random_model
from ppcompile.probes import PROBES, get_probe


def _ids(b, L, seed=0):
    return torch.randint(0, 128, (b, L), generator=torch.Generator().manual_seed(seed))


def _residual(norms):
    """x_res whose token norms are exactly `norms` (B, L)."""
    return torch.stack([norms, torch.zeros_like(norms)], dim=-1)


def test_every_sequence_takes_its_own_top_positions_with_its_first_real_token():
    norms = torch.tensor([[5.0, 1.0, 9.0, 3.0, 7.0, 2.0],
                          [8.0, 8.0, 3.0, 4.0, 5.0, 6.0],   # two left pads (large, but pads)
                          [1.0, 2.0, 3.0, 4.0, 0.0, 0.0]])  # two right pads
    valid = torch.tensor([[True] * 6, [False, False] + [True] * 4, [True] * 4 + [False, False]])
    rows, positions, ok = probes.sequence_positions(_residual(norms), valid, 3)
    assert rows.tolist() == [0, 1, 2]
    # k_t = 3 <= 10: each row's first real token (0, 2, 0), then its two largest real norms
    assert positions.tolist() == [[0, 2, 4], [2, 4, 5], [0, 2, 3]]
    assert ok.all()
    many = torch.arange(1.0, 31.0).repeat(2, 1)  # (2, 30): later positions larger
    # the first token is always in, whatever k_t (unlike the paper's rule: only when k_t <= 10)
    assert probes.sequence_positions(_residual(many), None, 11)[1][0].tolist() == [0] + list(range(20, 30))
    assert probes.sequence_positions(_residual(many), None, 10)[1][0].tolist() == [0] + list(range(21, 30))
    # a sequence with fewer real tokens than positions fills up with pads, which are not ok
    short = torch.tensor([[True, True] + [False] * 4])
    _, positions, ok = probes.sequence_positions(_residual(norms[:1]), short, 3)
    assert positions[0][ok[0]].tolist() == [0, 1] and ok.sum() == 2


def test_spread_positions_are_evenly_spaced_over_each_sequences_real_tokens():
    valid = torch.tensor([[True] * 9, [False] * 3 + [True] * 6, [True] * 4 + [False] * 5])
    x = torch.zeros(3, 9, 2)
    rows, positions, ok = probes.spread_positions(x, valid, 3)
    assert rows.tolist() == [0, 1, 2]
    # first, middle (round(i * (n-1) / 2)) and last real token of each row
    assert positions.tolist() == [[0, 4, 8], [3, 6, 8], [0, 2, 3]]
    assert ok.all()
    _, positions, ok = probes.spread_positions(x, valid, 6)
    assert positions[2].tolist() == [0, 1, 1, 2, 2, 3]  # 4 real tokens for 6 positions: each once
    assert positions[2][ok[2]].tolist() == [0, 1, 2, 3]
    assert probes.spread_positions(x, None, 5)[1][1].tolist() == [0, 2, 4, 6, 8]


def test_stratified_positions_cover_each_stratum_at_staggered_offsets_from_the_sink():
    x = torch.zeros(2, 24, 2)
    valid = torch.ones(2, 24, dtype=torch.bool)
    valid[1, :8] = False  # row 1: 16 real tokens from position 8
    rows, positions, ok = probes.stratified_positions(x, valid, 12)
    # row 0: n = 24, strata of 2: floor((i + 1/4) * 2) = 2i; row 1: n = 16, floor((i + 3/4) * 4 / 3) + 8;
    # the first stratum's position is always the sequence's first real token
    assert positions[0].tolist() == [2 * i for i in range(12)]
    assert positions[1].tolist() == [8] + [8 + int((i + 0.75) * 16 / 12) for i in range(1, 12)]
    assert rows.tolist() == [0, 1] and ok[0].all() and ok[1].sum() == 12
    _, few, _ = probes.stratified_positions(x, valid, 3)
    assert few.tolist() == [[0, 10, 18], [8, 8 + int(1.75 * 16 / 3), 8 + int(2.75 * 16 / 3)]]


def test_flat_takes_the_batchs_top_tokens_in_sequence_and_position_order():
    norms = torch.tensor([[1.0, 9.0, 2.0, 8.0], [7.0, 3.0, 6.0, 0.5], [50.0, 60.0, 4.0, 5.0]])
    valid = torch.tensor([[True] * 4, [True] * 4, [False, False, True, True]])  # row 2: big pads
    rows, positions, ok = probes.batch_top_tokens(_residual(norms), valid, 5)
    # each sequence's first real token (positions 0, 0, 2), then the 2 largest other real norms 9
    # and 8, in (sequence, position) order; row 2's big pads never
    assert rows.tolist() == [[0, 0, 0, 1, 2]] and positions.tolist() == [[0, 1, 3, 0, 2]] and ok.all()
    _, positions, _ = probes.batch_top_tokens(_residual(norms), valid, 6)
    assert positions.tolist() == [[0, 1, 3, 0, 2, 2]]  # then 6, at (1, 2): 7 is row 1's sink already


def _recorded_token_energies(monkeypatch) -> list:
    """Every value ops.token_energy returns from now on (the pass's graphs call it by name)."""
    energies = []
    record = ops.token_energy
    monkeypatch.setattr(ops, "token_energy", lambda act, ok: energies.append(record(act, ok)) or energies[-1])
    return energies


def _attention_by_hand(model, attn, x, pos):
    """One sequence's probe tokens x (n, d) at positions pos (n,) through the attention: rotary at
    the true positions, causal among them; each token's output squared, (n, H * hd)."""
    H, Hk, hd, n = attn.config.num_attention_heads, attn.config.num_key_value_heads, attn.head_dim, len(pos)
    x = x.unsqueeze(0)
    q = attn.q_proj(x).view(1, n, H, hd).transpose(1, 2)
    k = attn.k_proj(x).view(1, n, Hk, hd).transpose(1, 2).repeat_interleave(H // Hk, 1)
    v = attn.v_proj(x).view(1, n, Hk, hd).transpose(1, 2).repeat_interleave(H // Hk, 1)
    cos, sin = model.model.rotary_emb(x, pos.unsqueeze(0))
    q, k = apply_rotary_pos_emb(q, k, cos, sin)
    out = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    return out.transpose(1, 2).reshape(n, H * hd).pow(2)


def _top_heads(energy, attn, kept: int) -> list[int]:
    """The heads PPsp keeps from channel energies (C,): by the norm of c_j^2 * sum_i W_ij^4 per head."""
    W, hd = attn.o_proj.weight, attn.head_dim
    per_channel = energy.pow(2) * W.pow(4).sum(0)
    return sorted(per_channel.view(-1, hd).sum(-1).sqrt().topk(kept).indices.tolist())


def _capture(layer):
    """Hooks that record the layer's residual input and the normed input of each block."""
    cap = {}
    hooks = [layer.input_layernorm.register_forward_hook(lambda m, a, o: cap.update(attn_res=a[0], attn_x=o)),
             layer.post_attention_layernorm.register_forward_hook(lambda m, a, o: cap.update(mlp_res=a[0], mlp_x=o))]
    return cap, hooks


def test_designs_are_registered_objects_and_unknown_names_are_refused():
    assert get_probe("every") is PROBES["every"] and get_probe(PROBES["paper"]) is PROBES["paper"]
    assert pp.PPConfig(probe="spread").probe is PROBES["spread"]
    with pytest.raises(ValueError, match="unknown probe design 'top'; known designs: paper, every, spread, stratified, flat"):
        pp.PPConfig(probe="top")


def test_every_keeps_the_heads_its_per_sequence_probe_gives_by_hand(monkeypatch):
    # Only the attention of the last layer prunes, so its input is the dense model's.
    energies = _recorded_token_energies(monkeypatch)
    model = random_model("llama-gqa", num_attention_heads=16, num_key_value_heads=4)
    ids = _ids(4, 12)
    layer = model.model.layers[4]
    cap, hooks = _capture(layer)
    # paper's probe: 2 of 4 samples x 6 of 12 positions = 12 tokens; `every`: 3 per sequence
    c = pp.compile(model, 0.12, backend="eager", skip_layers=(0, 1, 2, 3), blocks="attention", probe="every",
                   sample_ratio=0.5, history=False)
    with torch.no_grad():
        c(ids)
        for h in hooks:
            h.remove()
        (kept,) = model.pp.runtime.last_selection().values()
        by_hand = []
        for b in range(4):
            norms = cap["attn_res"][b].norm(dim=-1)  # (12,)
            norms[0] = float("inf")  # the first token is always in
            pos = norms.topk(3).indices.sort().values
            by_hand.append(_attention_by_hand(model, layer.self_attn, cap["attn_x"][b, pos], pos))
    # the probe's attention output, token by token: rotary and causal mask at each row's positions
    torch.testing.assert_close(energies[-1], torch.cat(by_hand), rtol=1e-5, atol=1e-6)  # the call (not tracing)
    assert kept.tolist() == _top_heads(torch.cat(by_hand).sum(0), layer.self_attn, 7)  # 9 of 16 pruned


def test_flat_runs_the_batchs_top_tokens_per_sequence_at_their_true_positions(monkeypatch):
    energies = _recorded_token_energies(monkeypatch)
    model = random_model("llama-gqa", num_attention_heads=16, num_key_value_heads=4)
    ids = _ids(3, 10)
    mask = torch.ones(3, 10, dtype=torch.long)
    mask[2, :3] = 0  # left padding: never among the top tokens
    layer = model.model.layers[4]
    cap, hooks = _capture(layer)
    # the paper's probe would run 1 sample x 5 positions: `flat` runs the batch's 5 top tokens
    c = pp.compile(model, 0.12, backend="eager", skip_layers=(0, 1, 2, 3), blocks="attention", probe="flat",
                   history=False)
    with torch.no_grad():
        c(ids, attention_mask=mask)
        for h in hooks:
            h.remove()
        (kept,) = model.pp.runtime.last_selection().values()
        norms = cap["attn_res"].norm(dim=-1).masked_fill(mask == 0, -1)  # (3, 10)
        norms[[0, 1, 2], [0, 0, 3]] = float("inf")  # each sequence's first real token is always in
        top = sorted(norms.flatten().topk(5).indices.tolist())  # (sequence, position) order
        by_hand = []
        for b in sorted({i // 10 for i in top}):  # each sequence's chosen tokens attend among themselves
            pos = torch.tensor([i % 10 for i in top if i // 10 == b])
            by_hand.append(_attention_by_hand(model, layer.self_attn, cap["attn_x"][b, pos], pos))
    torch.testing.assert_close(energies[-1], torch.cat(by_hand), rtol=1e-5, atol=1e-6)
    assert kept.tolist() == _top_heads(torch.cat(by_hand).sum(0), layer.self_attn, 7)


def test_spread_fuses_each_token_with_the_history_at_its_position():
    model = random_model("llama-gqa")
    ids = _ids(3, 13)
    mask = torch.ones(3, 13, dtype=torch.long)
    mask[1, :4] = 0  # left padding: row 1 spreads over positions 4..12
    layer = model.model.layers[4]
    mlp = layer.mlp
    cap, hooks = _capture(layer)
    c = pp.compile(model, 0.12, backend="eager", skip_layers=(0, 1, 2, 3), mlp_multiple=16, blocks="mlp",
                   probe="spread", probe_budget=0.2)
    with torch.no_grad():
        c(ids, attention_mask=mask)  # warm-up
        act = mlp.act_fn(mlp.gate_proj(cap["mlp_x"])) * mlp.up_proj(cap["mlp_x"])
        # a history as large as the probe's energies, so that both weigh in the fusion
        history = torch.rand(13, 128, generator=torch.Generator().manual_seed(0)) * 2 * act.pow(2).mean()
        model.pp.runtime.seed({"model.layers.4.mlp": history.clone()})
        c(ids, attention_mask=mask)
    for h in hooks:
        h.remove()
    (kept,) = model.pp.runtime.last_selection().values()
    d, C = 64, 128
    # the budget's positions per sequence, by hand: k_b * k_t * (gate + up) <= 0.2 * B * L * (gate + up + down)
    k_t = max(k for k in range(2, 14) if 3 * k * 2 * d * C <= 0.2 * 3 * 13 * 3 * d * C)  # = 3
    P, Hh = [], []
    for b in range(3):
        first, n = (4, 9) if b == 1 else (0, 13)
        pos = torch.tensor([first + round(i * (n - 1) / (k_t - 1)) for i in range(k_t)])
        x = cap["mlp_x"][b, pos]
        P.append((mlp.act_fn(mlp.gate_proj(x)) * mlp.up_proj(x)).pow(2))  # (k_t, C)
        Hh.append(history[pos])
    P, Hh = torch.cat(P), torch.cat(Hh)
    alpha = P / (P + Hh + 1e-6)
    energy = (alpha * P + (1 - alpha) * Hh).sum(0)
    scores = energy * mlp.down_proj.weight.pow(4).sum(0).sqrt()
    assert kept.tolist() == sorted(scores.topk(64).indices.tolist())


@pytest.mark.parametrize("probe", list(PROBES))
def test_no_design_ever_probes_a_pad_token(probe):
    model = random_model("llama-gqa")
    ids = _ids(4, 16)
    mask = torch.ones(4, 16, dtype=torch.long)
    mask[1, :6] = 0  # left padding
    mask[3, -5:] = 0  # right padding
    mask[2, 3:] = 0  # a sequence shorter than the probe's positions
    other = ids.clone()
    other[mask == 0] = (ids[mask == 0] + 7) % 128  # change what the pads hold
    c = pp.compile(model, 0.4, backend="eager", skip_layers=(0,), mlp_multiple=16, probe=probe, probe_budget=0.3)
    with torch.no_grad():
        first = c(ids, attention_mask=mask).logits
        kept = model.pp.runtime.last_selection()
        model.pp.runtime.reset()
        second = c(other, attention_mask=mask).logits
        again = model.pp.runtime.last_selection()
    for site in kept:
        assert kept[site].tolist() == again[site].tolist(), site
    real = mask.bool()
    torch.testing.assert_close(first[real], second[real])
