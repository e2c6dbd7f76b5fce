import torch

from ppcompile import ops


def _residual(norms):
    """x_res whose token norms are exactly `norms` (B, L)."""
    return torch.stack([norms, torch.zeros_like(norms)], dim=-1)


def test_probe_is_sequence_first_with_the_sink_rule():
    norms = torch.tensor([[1.0, 5.0, 1.0, 4.0, 1.0, 3.0],
                          [1.0, 5.0, 1.0, 4.0, 1.0, 3.0],
                          [1.0, 1.0, 9.0, 1.0, 1.0, 1.0]])
    # position scores: L2 over b -> t2 = sqrt(83) largest, then t1 = sqrt(51), t3 = sqrt(33)
    kept_b, kept_t = ops.select_probe(_residual(norms), None, k_t=3, k_b=1)
    # k_t = 3 <= 10: the smallest kept position (1) is replaced by the sink token 0
    assert kept_t.tolist() == [0, 2, 3]
    # samples scored on positions {0, 2, 3}: row 2 has sqrt(1 + 81 + 1) > sqrt(1 + 1 + 16)
    assert kept_b.tolist() == [2]


def test_probe_without_sink_rule_when_many_positions():
    norms = torch.arange(1.0, 25.0).repeat(2, 1)  # (2, 24): later positions larger
    _, kept_t = ops.select_probe(_residual(norms), None, k_t=12, k_b=1)
    assert kept_t.tolist() == list(range(12, 24))


def test_samples_first_order_is_available():
    norms = torch.tensor([[9.0, 0.0, 0.0, 0.0], [0.0, 3.0, 3.0, 3.0]])
    kept_b, kept_t = ops.select_probe(_residual(norms), None, k_t=2, k_b=1, sequence_first=False)
    assert kept_b.tolist() == [0]  # 9 > sqrt(27)


def test_pad_tokens_rank_below_real_tokens():
    norms = torch.tensor([[100.0, 100.0, 1.0, 1.0], [2.0, 2.0, 2.0, 2.0]])
    valid = torch.tensor([[False, False, True, True], [True, True, True, True]])
    kept_b, kept_t = ops.select_probe(_residual(norms), valid, k_t=2, k_b=1)
    assert kept_t.tolist() == [0, 2] or kept_t.tolist() == [0, 3]  # sink rule keeps 0
    assert kept_b.tolist() == [1]  # row 0's big norms are padding


def test_probe_energy_excludes_pads():
    act = torch.tensor([[[1.0, 2.0]], [[3.0, float("nan")]]])  # (k_b=2, k_t=1, C=2); a NaN pad
    valid = torch.tensor([[True], [False]])
    assert ops.probe_energy(act, valid).tolist() == [[1.0, 4.0]]
    assert ops.probe_energy(act[:, :, :1], None).tolist() == [[5.0]]


def test_fusion_and_scores_match_the_formulas():
    P = torch.tensor([[1.0, 0.0], [3.0, 2.0]])
    H = torch.tensor([[1.0, 2.0], [1.0, 0.0]])
    c = ops.fuse_history(P, H)
    expect = [sum((p / (p + h + 1e-6)) * p + (h / (p + h + 1e-6)) * h for p, h in zip(P[:, j].tolist(), H[:, j].tolist()))
              for j in range(2)]
    assert torch.allclose(c, torch.tensor(expect))
    W = torch.tensor([[1.0, 2.0, 0.5, 1.0], [2.0, 1.0, 1.0, 3.0]])  # (d_out=2, C=4), 2 heads of 2
    e = torch.tensor([1.0, 2.0, 3.0, 4.0])
    ch = ops.channel_scores(e, ops.column_terms(W))
    assert torch.allclose(ch, torch.tensor([e[j] * (W[:, j] ** 4).sum().sqrt() for j in range(4)]))
    hs = ops.head_scores(e, ops.column_terms(W), 2)
    direct = [torch.stack([e[j] * W[i, j] ** 2 for i in range(2) for j in (2 * h, 2 * h + 1)]).norm() for h in range(2)]
    assert torch.allclose(hs, torch.stack(direct))
    assert ops.top_indices(torch.tensor([0.1, 5.0, 0.3, 2.0]), 2).tolist() == [1, 3]
    # two groups of 3: the best of each, though the global top 2 would be both in the first
    assert ops.top_indices(torch.tensor([9.0, 8.0, 0.0, 1.0, 2.0, 0.5]), 2, 2).tolist() == [0, 4]
    assert ops.head_channels(torch.tensor([0, 2]), 3).tolist() == [0, 1, 2, 6, 7, 8]


def test_gather_units_equals_gathering_each_channel():
    W = torch.arange(2 * 3 * 4, dtype=torch.float32).view(6, 4)  # 3 units of 2 rows, 2 units of 2 columns
    heads = torch.tensor([0, 2])
    rows = ops.head_channels(heads, 2)  # [0, 1, 4, 5]
    assert torch.equal(ops.gather_units(W, 0, heads, 2), W[rows])
    assert torch.equal(ops.gather_units(W, 1, torch.tensor([1]), 2), W[:, [2, 3]])
    assert torch.equal(ops.gather_units(W, 1, torch.tensor([3, 0]), 1), W[:, [3, 0]])
    b = torch.arange(6.0)
    assert torch.equal(ops.gather_units(b, 0, heads, 2), b[rows])


def test_budget_positions_is_the_largest_count_within_the_budget():
    from fractions import Fraction
    for B, L, k_b, (num, den), first, final, pair in [(8, 512, 1, (3, 200), 2, 1, 0), (1, 128, 1, (3, 200), 3, 1, 2),
                                                      (16, 300, 1, (1, 50), 7, 2, 5), (4, 40, 1, (1, 2), 1, 1, 0)]:
        budget = Fraction(num, den) * B * L * (first + final + pair * L)
        by_hand = max([k for k in range(1, L + 1) if k_b * k * (first + pair * L) <= budget], default=0)
        assert ops.budget_positions(B, L, k_b, num, den, first, final, pair) == min(L, max(by_hand, 2))
    assert ops.budget_positions(8, 512, 1, 3, 200, 2, 1, 0) == 92  # 1.5% of 4096 tokens x 3/2
    assert ops.budget_positions(1, 16, 1, 1, 1000, 2, 1, 0) == 2  # the floor
    assert ops.budget_positions(4, 40, 1, 1, 2, 1, 1, 0) == 40  # at most L


def test_ema_touches_kept_channels_only():
    H = torch.ones(2, 4)
    x = torch.tensor([[[2.0, 4.0], [0.0, 2.0]]])  # (B=1, L=2, k=2): compact input of channels 1, 3
    kept = torch.tensor([1, 3])
    ops.units(H, 1).index_copy_(1, kept, ops.ema_rows(H, kept, x, None, torch.tensor(0.5)))  # as the graph writes it
    # kept: 1 + 0.5 * (x^2 - 1); others untouched
    assert H.tolist() == [[1.0, 2.5, 1.0, 8.5], [1.0, 0.5, 1.0, 2.5]]


def test_ema_of_kept_heads_moves_each_head_as_its_channels():
    H = torch.rand(3, 8)  # (L=3, C=8): 4 heads of 2 channels
    x = torch.rand(2, 3, 4)  # (B=2, L=3, 2 kept heads x 2): the compact input of heads 1 and 3
    expected = H.clone()
    for j, c in enumerate([2, 3, 6, 7]):  # heads 1 and 3's channels, by hand
        expected[:, c] = H[:, c] + 0.25 * (x[:, :, j].pow(2).mean(0) - H[:, c])
    kept = torch.tensor([1, 3])
    ops.units(H, 2).index_copy_(1, kept, ops.ema_rows(H, kept, x, None, torch.tensor(0.25), 2))
    torch.testing.assert_close(H, expected)


def test_ema_of_every_channel_from_the_energy_leaves_pad_positions_alone():
    H = torch.ones(3, 2)
    E = torch.tensor([[3.0, 5.0], [9.0, 1.0], [7.0, 7.0]])  # (L=3, C=2): the per-position energy
    valid = torch.tensor([[True, True, False], [True, False, False]])  # position 2: pads only
    H.add_(ops.ema_step(H, E, valid, torch.tensor(0.5)))  # as the graph writes it
    assert H.tolist() == [[2.0, 3.0], [5.0, 1.0], [1.0, 1.0]]  # 1 + 0.5 * (E - 1); the pad row untouched
    H.add_(ops.ema_step(H, E, None, torch.tensor(0.0)))  # the warm-up call: nothing moves
    assert H.tolist() == [[2.0, 3.0], [5.0, 1.0], [1.0, 1.0]]


def test_ema_warmup_weight_is_zero_and_pads_do_not_count():
    step, seeded = torch.tensor(0), torch.tensor(False)
    assert ops.ema_weight(step, seeded, 0.99).item() == 0.0
    ops.advance_(step, seeded)
    assert ops.ema_weight(step, seeded, 0.99).item() == 1.0  # unseeded history: take the batch
    ops.advance_(step, seeded)
    assert abs(ops.ema_weight(step, seeded, 0.99).item() - 0.01) < 1e-7
    H = torch.zeros(2, 1)
    x = torch.tensor([[[2.0], [3.0]], [[4.0], [5.0]]])  # (B=2, L=2, 1)
    valid = torch.tensor([[True, False], [True, False]])  # position 1 is padding everywhere
    ops.units(H, 1).index_copy_(1, torch.tensor([0]), ops.ema_rows(H, torch.tensor([0]), x, valid, torch.tensor(1.0)))
    assert H.tolist() == [[10.0], [0.0]]  # mean of 4 and 16; position 1 untouched


def _attention_case(seed=0, B=2, H=6, KV=2, T=7, D=4):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, 1, D, generator=g)
    k, v = torch.randn(B, KV, T, D, generator=g), torch.randn(B, KV, T, D, generator=g)
    return q, k, v


def test_one_query_attention_of_kept_heads_equals_sdpa_on_those_heads():
    F = torch.nn.functional
    q, k, v = _attention_case()
    B, H, _, D = q.shape
    KV, T = k.shape[1], k.shape[2]
    kept = torch.tensor([1, 2, 5])
    k_rep, v_rep = k.repeat_interleave(H // KV, 1), v.repeat_interleave(H // KV, 1)  # (B, H, T, D)
    allowed = torch.rand(B, 1, 1, T, generator=torch.Generator().manual_seed(1)) > 0.3
    allowed[..., -1] = True  # the query attends at least to itself
    per_head = torch.randn(B, H, 1, T)  # an additive mask per head (e.g. ALiBi)
    for mask in (None, allowed, torch.where(allowed, 0.0, float("-inf")), per_head):
        for scale in (None, 0.3):
            full = F.scaled_dot_product_attention(q, k_rep, v_rep, attn_mask=mask, scale=scale)  # (B, H, 1, D)
            want = full.index_select(1, kept)
            qk = q.index_select(1, kept)
            # K/V repeated per query head, and K/V heads as they are (GQA): the same result
            torch.testing.assert_close(ops.attend_one_query(qk, k_rep, v_rep, kept, H, mask, scale), want)
            torch.testing.assert_close(ops.attend_one_query(qk, k, v, kept, H, mask, scale), want)


def test_spread_count_shares_the_papers_tokens_over_every_sequence():
    assert ops.spread_count(8, 512, 1, 256) == 32
    assert ops.spread_count(3, 512, 1, 256) == 86  # ceil(256 / 3)
    assert ops.spread_count(16, 20, 1, 10) == 2  # floor of two positions
    assert ops.spread_count(1, 20, 1, 30) == 20  # at most the sequence
    assert ops.packed_count(512, 1, 256) == 256 and ops.packed_count(20, 3, 10) == 20  # a packed row: at most L


def test_tokens_and_side_inputs_at_each_rows_own_positions_equal_a_loop():
    B, L, D = 3, 7, 4
    g = torch.Generator().manual_seed(0)
    x = torch.randn(B, L, D, generator=g)
    rows = torch.tensor([0, 2])
    positions = torch.tensor([[0, 3, 5], [1, 2, 6]])
    expect = torch.stack([x[b, positions[i]] for i, b in enumerate(rows.tolist())])
    assert torch.equal(ops.tokens_at(x, rows, positions), expect)
    mask = torch.randn(B, 1, L, L, generator=g)  # (B, 1, queries, keys): both sequence dims
    got = ops.side_at(mask, 0, (2, 3), rows, positions)
    loop = torch.stack([mask[b, :, positions[i]][..., positions[i]] for i, b in enumerate(rows.tolist())])
    assert torch.equal(got, loop)
    cos = torch.randn(1, L, D, generator=g)  # broadcast over the batch: each row still its positions
    assert torch.equal(ops.side_at(cos, 0, (1,), rows, positions), cos[0][positions])
    flat = torch.randn(L, D, generator=g)  # no batch dim at all
    assert torch.equal(ops.side_at(flat, -1, (0,), rows, positions), flat[positions])
    head_last = torch.randn(B, L, 2, generator=g).transpose(1, 2)  # (B, 2, L): a dim between
    assert torch.equal(ops.side_at(head_last, 0, (2,), rows, positions),
                       torch.stack([head_last[b][:, positions[i]] for i, b in enumerate(rows.tolist())]))


def test_token_energy_and_history_zero_pads_so_they_fuse_to_nothing():
    act = torch.tensor([[[1.0, 2.0], [3.0, float("nan")]]])  # (1, 2, C=2); the second token a pad
    ok = torch.tensor([[True, False]])
    history = torch.tensor([[10.0, 20.0], [30.0, 40.0], [50.0, 60.0]])  # (L=3, C)
    energy = ops.token_energy(act, ok)
    hist = ops.history_at(history, torch.tensor([[2, 0]]), ok)
    assert energy.tolist() == [[1.0, 4.0], [0.0, 0.0]]
    assert hist.tolist() == [[50.0, 60.0], [0.0, 0.0]]
    assert torch.allclose(ops.fuse_history(energy, hist), ops.fuse_history(energy[:1], hist[:1]))


def test_an_additive_mask_is_zero_where_attended_minus_inf_elsewhere_and_attention_reads_it_alike():
    mask = torch.tensor([[True, False], [True, True]])
    made = ops.additive_mask(mask, torch.bfloat16)
    assert made.dtype == torch.bfloat16 and made.tolist() == [[0.0, float("-inf")], [0.0, 0.0]]
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 5, 8, generator=g, dtype=torch.bfloat16) for _ in range(3))
    causal = torch.ones(5, 5, dtype=torch.bool).tril().expand(2, 1, 5, 5)
    want = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=causal)
    got = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=ops.additive_mask(causal, q.dtype))
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_a_packed_rows_mask_keeps_each_sequence_apart_and_causal():
    rows, positions = torch.tensor([[0, 0, 1, 1, 2]]), torch.tensor([[1, 3, 0, 2, 3]])
    allowed = ops.packed_mask(None, rows, positions)[0, 0]  # own sequence, at or before
    expect = [[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [0, 0, 1, 0, 0], [0, 0, 1, 1, 0], [0, 0, 0, 0, 1]]
    assert allowed.int().tolist() == expect
    additive = torch.zeros(1, 1, 5, 5)
    additive[..., 1] = -3.0  # the model's own mask, already at the probe's tokens
    got = ops.packed_mask(additive, rows, positions)[0, 0]
    low = torch.finfo(torch.float32).min
    assert got.tolist() == [[0.0 if e else low for e in row] if i != 1 else [0.0, -3.0, low, low, low]
                            for i, row in enumerate(expect)]
    assert torch.equal(ops.packed_mask(additive == 0, rows, positions)[0, 0],
                       torch.tensor(expect).bool() & (additive == 0)[0, 0])


def test_dynamic_probe_sizes_keep_their_values_without_the_bounds_that_cannot_bind():
    # A dynamic size is >= 2 (Dynamo specializes 0 and 1): min(B, .), min(L, .) and max(., 1)
    # cannot bind there and must not reach Inductor (each one multiplied its codegen time)
    from torch._dynamo.source import ConstantSource
    from torch.fx.experimental.symbolic_shapes import DimDynamic, ShapeEnv
    env = ShapeEnv()
    B, L = (env.create_symintnode(env.create_symbol(h, ConstantSource(n), dynamic_dim=DimDynamic.DYNAMIC), hint=h)
            for n, h in (("B", 8), ("L", 512)))
    k_b, k_t = ops.probe_count(B, 1, 20, 1), ops.probe_count(L, 1, 2, 2)
    spread = ops.spread_count(B, L, k_b, k_t)
    assert "Min" not in str(spread.node.expr) and "Max" not in str(k_b.node.expr)
    for b in range(2, 45):
        for l in range(2, 200, 3):
            at = {B.node.expr: b, L.node.expr: l}
            want_b, want_t = min(b, max(-(-b // 20), 1)), min(l, max(-(-l // 2), 2))
            assert (int(k_b.node.expr.xreplace(at)), int(k_t.node.expr.xreplace(at))) == (want_b, want_t)
            assert int(spread.node.expr.xreplace(at)) == min(l, max(-(-want_b * want_t // b), 2))
