"""The tensor functions the rewrite inserts: probe selection, history fusion, scores, EMA.

Each is a plain function of tensors and Python ints, so Inductor traces through it, and every
output shape depends only on the ints (never on data): no host synchronization.
"""
from __future__ import annotations

import torch

EPS = 1e-6


def token_norms(x_res: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
    """N[b, t] = ||x_res[b, t]||_2 on the pre-norm residual; pad tokens get -1, below any norm."""
    norms = x_res.float().norm(dim=-1)  # (B, L)
    return norms if valid is None else torch.where(valid, norms, -1.0)


def select_probe(x_res: torch.Tensor, valid: torch.Tensor | None, k_t, k_b,
                 sequence_first: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Probe rows and positions: (kept_b (k_b,), kept_t (k_t,)), each sorted ascending.

    Sequence first (the paper's order): positions by the L2 norm over the batch of N[:, t],
    then samples by the L2 norm of N[b, kept positions]. With k_t <= 10 the smallest kept
    position is replaced by 0 (the attention-sink token).
    """
    norms = token_norms(x_res, valid)  # (B, L)
    energy = norms.clamp(min=0)  # pads weigh nothing in either ranking
    if sequence_first:
        kept_t = _positions(energy, k_t)
        kept_b = _top_sorted(energy.index_select(1, kept_t).norm(dim=1) + _pad_penalty(norms, 1), k_b)
    else:
        kept_b = _top_sorted(energy.norm(dim=1) + _pad_penalty(norms, 1), k_b)
        kept_t = _positions(energy.index_select(0, kept_b), k_t)
    return kept_b, kept_t


def _positions(energy: torch.Tensor, k_t) -> torch.Tensor:
    kept_t = _top_sorted(energy.norm(dim=0), k_t)
    # The sink rule as arithmetic, not a branch: k_t may be a dynamic size, and a branch on it
    # would make Dynamo compile once per side of the rule.
    first = kept_t[:1] * torch.sym_ite(k_t > 10, 1, 0)
    return torch.cat([first, kept_t[1:]])


def additive_mask(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A boolean attention mask (True: attend) as the additive one scaled_dot_product_attention
    makes of it: 0 where True, -inf where False, in `dtype`."""
    return torch.where(mask, 0.0, float("-inf")).to(dtype)


def packed_mask(mask: torch.Tensor | None, rows: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """The attention mask of a packed probe row (1, k) of tokens from several sequences: a token
    attends to the tokens of its own sequence at its position or before (causal at their true
    positions), and where the model's own mask, gathered at those tokens (side_at), allows.
    Boolean, or additive like `mask`: (1, 1|H, k, k)."""
    same = rows.unsqueeze(-1) == rows.unsqueeze(-2)  # (1, k, k)
    allowed = (same & (positions.unsqueeze(-1) >= positions.unsqueeze(-2))).unsqueeze(1)  # (1, 1, k, k)
    if mask is None:
        return allowed
    if mask.dtype == torch.bool:
        return allowed & mask
    return torch.where(allowed, mask, torch.finfo(mask.dtype).min)


def tokens_at(x: torch.Tensor, rows: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """x (B, L, ...) at each probed row's own positions: rows (k_b,) (or each token's sequence,
    (k_b, k_t), for a packed row), positions (k_b, k_t) -> (k_b, k_t, ...)."""
    return x[rows if rows.dim() == 2 else rows.unsqueeze(1), positions]


def side_at(side: torch.Tensor, b_dim: int, s_dims: tuple[int, ...], rows: torch.Tensor,
            positions: torch.Tensor) -> torch.Tensor:
    """A side input of the block (a rotary table, a mask) at each probed row's own positions.
    `b_dim`: the side's batch dim (size B or 1; negative: the side lacks it, broadcast); `s_dims`:
    its sequence dims (a mask has two: queries and keys, both the probe's tokens). `rows` (k_b,),
    or (k_b, k_t) for a packed row (each token's sequence; a mask is read in the query's). The
    result has k_b in the batch dim and k_t in each sequence dim, its other dims as they were."""
    if b_dim < 0:  # the side broadcasts over a batch dim it lacks: give it one of size 1
        side = side.reshape((1,) * -b_dim + tuple(side.shape))
        s_dims, b_dim = tuple(d - b_dim for d in s_dims), 0
    order = [b_dim, *s_dims] + [d for d in range(side.dim()) if d != b_dim and d not in s_dims]
    moved = side.permute(order)  # (B|1, L, [L,] rest)
    r = rows if moved.shape[0] != 1 else torch.zeros_like(rows)
    n = len(s_dims)
    first = r.view(-1, *[1] * n) if r.dim() == 1 else r.view(*r.shape, *[1] * (n - 1))
    index = [first] + [positions.view(positions.shape[0], *[1] * i, -1, *[1] * (n - 1 - i)) for i in range(n)]
    gathered = moved[tuple(index)]  # (k_b, k_t, [k_t,] rest)
    return gathered.permute([order.index(d) for d in range(side.dim())])


def token_energy(act: torch.Tensor, ok: torch.Tensor) -> torch.Tensor:
    """act^2 of every probe token (k_b, k_t, C) in fp32, pads and repeats zero: (k_b * k_t, C)."""
    return torch.where(ok.unsqueeze(-1), act.float().pow(2), 0.0).flatten(0, 1)


def history_at(history: torch.Tensor, positions: torch.Tensor, ok: torch.Tensor) -> torch.Tensor:
    """The history (L, C) at every probe token's position (k_b, k_t), zero where `ok` is False:
    (k_b * k_t, C). A zero probe and history fuse to zero (fuse_history), so such tokens add nothing."""
    return torch.where(ok.unsqueeze(-1), history[positions], 0.0).flatten(0, 1)


def _pad_penalty(norms: torch.Tensor, dim: int) -> torch.Tensor:
    # A sample made only of padding must lose to any real one even when all norms are zero.
    return torch.where((norms >= 0).any(dim=dim), 0.0, -1.0)


def _top_sorted(scores: torch.Tensor, k: int) -> torch.Tensor:
    return torch.topk(scores, k, sorted=False).indices.sort(-1).values


def probe_count(n, num: int, den: int, floor: int):
    """min(n, max(ceil(n * num / den), floor)): how many of n rows or positions the probe keeps.

    Integer arithmetic on an int or a dynamic size alike: exact (no float rounding) and free of
    comparisons that would make Dynamo guard on n. A min or max that cannot bind for any n the
    size can take (its range: a dynamic size is >= 2, Dynamo specializes 0 and 1) is left out of
    the expression, the value unchanged: every one left in a dynamic size's expression multiplies
    Inductor's codegen time (a tiny llama's cold compile: codegen 166 s with them, 38 s without)."""
    c = -(-n * num // den)  # ceil(n * num / den), increasing in n
    least = least_value(n)
    if num > den or floor > least:  # c > n, or floor > n, can occur
        return torch.sym_min(n, torch.sym_max(c, floor))
    return c if -(-least * num // den) >= floor else torch.sym_max(c, floor)


def spread_count(n_b, n_t, k_b, k_t):
    """Positions per sequence when all n_b sequences share the tokens of a k_b x k_t probe: the
    ceiling of k_b * k_t / n_b, at least 2, at most n_t. Integer arithmetic on ints and dynamic
    sizes alike. For a dynamic n_t the pass's probe is within the batch (k_b <= n_b, k_t <= n_t),
    so the ceiling is at most n_t and the bound binds only where n_t < 2 can occur (left out
    otherwise, as in probe_count)."""
    c = torch.sym_max(-(-k_b * k_t // n_b), 2)
    return c if not isinstance(n_t, int) and least_value(n_t) >= 2 else torch.sym_min(n_t, c)


def least_value(n) -> int:
    """The least value `n` can take, known without a guard: an int itself; a dynamic size, the
    lower bound of its range in Dynamo's shape environment (0 where none is known)."""
    if isinstance(n, int):
        return n
    low = n.node.shape_env.bound_sympy(n.node.expr).lower
    return int(low) if low.is_finite else 0


def packed_count(n_t, k_b, k_t):
    """Tokens of a packed probe row holding a k_b x k_t probe's tokens: k_b * k_t, at most L."""
    return torch.sym_min(n_t, k_b * k_t)


def budget_positions(n_b, n_t, k_b, num: int, den: int, first: int, final: int, pair: int):
    """Positions per probed sample that keep the probe within num/den of a block's multiply-adds:
    the largest k_t with k_b * k_t * (first + pair * L) <= num/den * B * L * (first + final + pair * L),
    at least 2 and at most L. `first`: the block's first projections' multiply-adds per token (all
    the probe runs), `final`: its final projection's, `pair`: its attention's per pair of tokens
    (0 for an MLP; the probe's k_t keys are counted as L, an upper bound). Integer arithmetic on
    ints and dynamic sizes alike (B = n_b, L = n_t)."""
    allowed = (num * n_b * n_t * (first + final + pair * n_t)) // (den * k_b * (first + pair * n_t))
    return torch.sym_min(n_t, torch.sym_max(allowed, 2))


def probe_energy(act: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
    """P[t, j] = mean over probe samples of act[:, t, j]^2; pad tokens excluded."""
    sq = act.float().pow(2)  # (k_b, k_t, C)
    if valid is None:
        return sq.mean(dim=0)
    w = valid.unsqueeze(-1)  # (k_b, k_t, 1); where, not a product: a fully masked pad row may be NaN
    return torch.where(w, sq, 0.0).sum(0) / w.sum(0).clamp(min=1)


def fuse_history(probe: torch.Tensor, history: torch.Tensor) -> torch.Tensor:
    """Channel energy c_j = sum_t F[t, j], F = alpha*P + (1-alpha)*H, alpha = P / (P + H + eps);
    t runs over the probe's positions (the paper's design) or its tokens (token_energy, history_at)."""
    alpha = probe / (probe + history + EPS)  # (k_t, C)
    return (alpha * probe + (1 - alpha) * history).sum(0)  # (C,)


def probe_share(probe: torch.Tensor, history: torch.Tensor) -> torch.Tensor:
    """How much of the fused energy came from the probe: sum(alpha*P) / sum(F), a 0-d tensor."""
    alpha = probe / (probe + history + EPS)
    from_probe = (alpha * probe).sum()
    return from_probe / (from_probe + ((1 - alpha) * history).sum() + EPS)


def column_terms(weight: torch.Tensor) -> torch.Tensor:
    """The weight side of the scores: sum_i W_ij^4 per input channel j of the final projection
    W (d_out, C), in fp32. (C,). It depends on the weights alone, so the pass computes it once
    when it has the real weights."""
    return weight.float().pow(4).sum(0)


def channel_scores(energy: torch.Tensor, terms: torch.Tensor) -> torch.Tensor:
    """PPsp per input channel j of the final projection: c_j * sqrt(sum_i W_ij^4); `terms` from
    column_terms."""
    return energy * terms.sqrt()


def head_scores(energy: torch.Tensor, terms: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Per head: the Frobenius norm of {c_j W_ij^2 : i, j in the head}; `terms` from column_terms."""
    per_channel = energy.pow(2) * terms  # (C,) squared channel scores
    return per_channel.view(n_heads, -1).sum(-1).sqrt()  # (H,)


def gather_units(weight: torch.Tensor, dim: int, kept: torch.Tensor, unit: int) -> torch.Tensor:
    """The kept units of `weight` along `dim`, each `unit` consecutive rows or columns (a head's
    head_dim channels; 1 for an MLP channel). Gathering whole units through a view keeps the
    innermost loop over contiguous memory, which Inductor vectorizes: for a head's columns that
    is about 5x faster than gathering the same columns one by one."""
    if unit == 1:
        return weight.index_select(dim, kept)
    units = weight.unflatten(dim, (-1, unit)).index_select(dim, kept)  # (..., k, unit, ...)
    return units.flatten(dim, dim + 1)


def top_indices(scores: torch.Tensor, k: int, groups: int = 1) -> torch.Tensor:
    """The k best indices, ascending (sorted indices keep memory access in order). `groups` > 1:
    the k // groups best of each of `groups` runs of consecutive units (a shard's heads or
    channels), so every shard keeps as many."""
    if groups == 1:
        return _top_sorted(scores, k)
    per = scores.shape[-1] // groups
    local = _top_sorted(scores.view(groups, per), k // groups)  # (groups, k / groups)
    return (local + torch.arange(groups, device=scores.device)[:, None] * per).flatten()


def head_channels(heads: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Kept heads (k,) -> their channel indices (k * head_dim,) in the projection's layout."""
    offsets = torch.arange(head_dim, device=heads.device)
    return (heads.unsqueeze(-1) * head_dim + offsets).flatten()


def activation_scores(act: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
    """GRIFFIN's statistic per channel of a block's activation act (B, L, C): each token's
    activation divided by its L2 norm over the channels, the L2 norm of that over the sequence's
    real tokens, summed over the sequences. (C,)"""
    a = act.float()
    z = a / a.norm(dim=-1, keepdim=True).clamp(min=EPS)
    if valid is not None:
        z = torch.where(valid.unsqueeze(-1), z, 0.0)
    return z.pow(2).sum(1).sqrt().sum(0)


def mask_valid(mask: torch.Tensor, seq_len) -> torch.Tensor:
    """(B, L) real tokens from a 4-d attention mask (B, 1|H, L, K), boolean (True: attend) or
    additive (0: attend): token t is real when it may attend to itself, in key column t (true while
    the call's tokens start the cache: no cache, or an empty one)."""
    allowed = mask if mask.dtype == torch.bool else mask > torch.finfo(mask.dtype).min / 2
    return allowed[:, 0, :, :seq_len].diagonal(dim1=-2, dim2=-1)


def attend_one_query(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kept: torch.Tensor, heads: int,
                     mask: torch.Tensor | None, scale: float | None) -> torch.Tensor:
    """scaled_dot_product_attention of one query token per kept head, written as two reductions
    that Inductor fuses with the gathers: each kept head reads its K/V rows where they lie (no
    copy of the cache, no pruned head read), in fp32. A decode step's attention.

    q (B, k, 1, D) the kept query heads; k, v (B, Hk, T, D) with Hk the model's query heads (K/V
    repeated per query head) or its K/V heads (GQA); kept (k,) query heads of `heads`; mask
    broadcastable to (B, heads, 1, T), boolean (True: attend) or additive. Returns (B, k, 1, D)."""
    kv = kept // (heads // k.shape[1])  # the K/V head each kept query head reads
    keys, values = k.index_select(1, kv).float(), v.index_select(1, kv).float()  # (B, k, T, D)
    scores = (q.float() * keys).sum(-1) * (q.shape[-1] ** -0.5 if scale is None else scale)  # (B, k, T)
    if mask is not None:
        if mask.dim() == 4 and mask.shape[1] == heads > 1:  # one mask per head
            mask = mask.index_select(1, kept)
        mask = mask[..., 0, :] if mask.dim() > 1 else mask  # the query's row: (B|1, k|1, T)
        scores = torch.where(mask, scores, float("-inf")) if mask.dtype == torch.bool else scores + mask
    out = (scores.softmax(-1).unsqueeze(-1) * values).sum(-2)  # (B, k, D)
    return out.unsqueeze(2).to(q.dtype)


def position_energy(x: torch.Tensor, valid: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean over the batch of x^2 per position and channel, and which positions had a token.

    x: (B, L, C) -> (mean (L, C), present (L,) bool)."""
    present = torch.ones(x.shape[1], dtype=torch.bool, device=x.device) if valid is None else valid.any(0)
    return probe_energy(x, valid), present  # the same masked mean over dim 0


def ema_rows(history: torch.Tensor, kept: torch.Tensor, x: torch.Tensor,
             valid: torch.Tensor | None, weight: torch.Tensor, unit: int = 1) -> torch.Tensor:
    """The kept units' new history columns: H[t, j] + weight * (mean_b x[b, t, j]^2 - H[t, j]).
    The graph writes them back with `units(history, unit).index_copy_(1, kept, rows)`: computing
    them apart from the write keeps the work in the layer's outlined segment (passes/outline.py).

    history (L, C) is this call's rows of the table; `kept` (k,) units of `unit` channels each (a
    head's head_dim, or 1): a head's channels are read as one run, not one by one; x (B, L, k * unit)
    the compact input of the final projection; `weight` a 0-d tensor: 1 - momentum normally, 0 on
    the warm-up batch, 1 for the first batch of an unseeded history. Positions with no real token
    keep their value.
    -> (L, k, unit)
    """
    new, present = position_energy(x, valid)  # (L, k * unit), (L,)
    new = new.unflatten(1, (-1, unit))  # (L, k, unit)
    old = units(history, unit).index_select(1, kept)  # (L, k, unit)
    return old + torch.where(present[:, None, None], weight * (new - old), 0.0)


def units(history: torch.Tensor, unit: int) -> torch.Tensor:
    """The history (L, C) as (L, C / unit, unit), a view: its kept units are gathered and written
    back along dim 1, so a head moves as one contiguous run of channels."""
    return history.unflatten(1, (-1, unit))


def ema_step(history: torch.Tensor, energy: torch.Tensor, valid: torch.Tensor | None,
             weight: torch.Tensor) -> torch.Tensor:
    """Every channel's history step, weight * (E[t, j] - H[t, j]), where E (L, C) is the
    per-position energy of the block's own activations (probe_energy over the whole batch): where
    every channel ran, every channel's history learns from it (no gather, no scatter). The graph
    adds it with `history.add_(step)`. Positions with no real token get 0; `weight` as in ema_rows.
    -> (L, C)"""
    step = weight * (energy - history)  # (L, C)
    if valid is not None:
        step = torch.where(valid.any(0).unsqueeze(-1), step, 0.0)
    return step


def ema_weight(step: torch.Tensor, seeded: torch.Tensor, momentum: float) -> torch.Tensor:
    """The EMA step size of this call: 0 on the warm-up call, 1 into an unseeded history."""
    return torch.where(step == 0, 0.0, torch.where(seeded, 1.0 - momentum, 1.0))


def advance_(step: torch.Tensor, seeded: torch.Tensor) -> torch.Tensor:
    """After a call: the history is seeded once a non-warm-up call updated it; count the call."""
    seeded.logical_or_(step > 0)
    return step.add_(1)


def accumulate_stats_(sq: torch.Tensor, count: torch.Tensor, total: torch.Tensor, total_sq: torch.Tensor,
                      x: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
    """Calibration sums of the final projection's input x (B, L, C), in place, over real tokens:
    sq (L, C) += sum_b x^2, count (L,) += tokens per position, total / total_sq (C,) += sum of x / x^2.
    """
    x = x.float()
    if valid is not None:
        x = torch.where(valid.unsqueeze(-1), x, 0.0)
        tokens = valid.sum(0)  # (L,)
    else:
        tokens = torch.full((x.shape[1],), x.shape[0], device=x.device)
    x_sq = x.pow(2)
    sq.add_(x_sq.sum(0))
    count.add_(tokens.to(count.dtype))
    total.add_(x.sum((0, 1)).to(total.dtype))
    return total_sq.add_(x_sq.sum((0, 1)).to(total_sq.dtype))
