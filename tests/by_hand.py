"""Probe Pruning written out from ALGORITHM.md on a LLaMA-family model's own modules, with no
ppcompile code: which heads and channels each block keeps, for every probe design, and the
forward they give. The tests compare the pass's selections with these, so a wrong selection
(lowest instead of highest scores, shifted indices) fails them, whatever the pass records.

Pruned units are zeroed at the final projection's input: the same output as the compact matmuls,
up to float summation order. Scores are computed in float64, so where the pass's fp32 scores put
two units within `TIE` of each other at the cut, either may be kept: `follow` (the pass's
selection) is then adopted for the rest of the forward, and every other difference fails.
"""
from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

TIE = 1e-3  # relative distance to the cut within which float rounding may swap two units
EPS = 1e-6


# ---- counts (ALGORITHM.md, steps 2 and 6) ----
def layer_ratio(ratio: float, n_layers: int, n_skip: int) -> float:
    return min(round(ratio * n_layers / (n_layers - n_skip), 2), 1.0)


def kept_heads(r_l: float, heads: int) -> int:
    return max(1, heads - math.floor(r_l * heads))


def kept_channels(r_l: float, channels: int, multiple: int) -> int:
    kept = max(1, channels - math.floor(r_l * channels))
    return min(channels, math.ceil(kept / multiple) * multiple)


def probe_sizes(design: str, B: int, L: int, position_ratio=0.5, sample_ratio=0.05) -> tuple[int, int]:
    """(probed sequences, tokens per probed sequence) with no budget: the paper's k_b x k_t; the
    per-sequence designs spread as many tokens over every sequence (at least 2 each); flat puts
    them in one row (at most L)."""
    k_b = min(B, max(math.ceil(B * sample_ratio), 1))
    k_t = min(L, max(math.ceil(L * position_ratio), 2))
    if design == "paper":
        return k_b, k_t
    if design == "flat":
        return 1, min(L, k_b * k_t)
    return B, min(L, max(math.ceil(k_b * k_t / B), 2))


# ---- which tokens each design probes: a list of (sequence, positions (k,), ok (k,)) ----
def probe_tokens(design: str, norms: torch.Tensor, valid: torch.Tensor) -> list:
    """norms (B, L): the block's pre-norm residual norms; valid (B, L) bool. For `paper` one
    entry (rows, shared positions) instead: see paper_probe."""
    B, L = norms.shape
    _, k = probe_sizes(design, B, L)
    if design == "flat":
        return _flat(norms, valid, k)
    out = []
    for b in range(B):
        real = valid[b].nonzero().flatten().tolist()
        first, n = real[0], len(real)
        if design == "spread":  # evenly spaced over the real tokens, first and last included
            pos = [first + math.floor(i * (n - 1) / max(k - 1, 1) + 0.5) for i in range(k)]
        elif design == "stratified":  # one per stratum, sequence b at offset (b + 1/2) / B of it
            pos = [first + (0 if i == 0 else math.floor((i + (b + 0.5) / B) * n / k)) for i in range(k)]
        elif design == "every":  # the sink, then the top residual norms among the real tokens
            others = sorted(real[1:], key=lambda t: -norms[b, t].item())[:k - 1]
            pos = sorted([first] + others)
            pos += [p for p in range(L) if p not in pos][:k - len(pos)]  # too few real tokens: pads, not ok
        else:
            raise ValueError(design)
        ok = [valid[b, p].item() and (i == 0 or p != pos[i - 1]) for i, p in enumerate(pos)]
        out.append((b, torch.tensor(pos), torch.tensor(ok)))
    return out


def _flat(norms, valid, k):
    """Each sequence's first real token, then the batch's largest other real norms, k in all."""
    B, L = norms.shape
    score = {}
    for b in range(B):
        real = valid[b].nonzero().flatten().tolist()
        for t in range(L):
            score[b, t] = math.inf if t == real[0] else norms[b, t].item() if valid[b, t] else -1.0
    chosen = sorted(sorted(score, key=lambda bt: -score[bt])[:k])
    out = []
    for b in sorted({b for b, _ in chosen}):
        pos = [t for bb, t in chosen if bb == b]
        out.append((b, torch.tensor(pos), torch.tensor([score[b, t] >= 0 for t in pos])))
    return out


def paper_probe(norms: torch.Tensor, valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The paper's probe: positions by the L2 norm over the batch of N[:, t] (the sink at 0 when
    k_t <= 10), then sequences by the L2 norm of N[b, kept positions]; both ascending."""
    B, L = norms.shape
    k_b, k_t = probe_sizes("paper", B, L)
    n = torch.where(valid, norms, 0.0).double()
    positions = sorted(n.norm(dim=0).topk(k_t).indices.tolist())
    if k_t <= 10:
        positions[0] = 0
    rows = sorted(n[:, positions].norm(dim=1).topk(k_b).indices.tolist())
    return torch.tensor(rows), torch.tensor(positions)


# ---- the blocks, on a subset of heads/channels ----
def attention(attn, x, cos, sin, allowed):
    """The attention's input of o_proj, (N, T, H * hd): x (N, T, d), rotary tables (N, T, hd),
    allowed (N, T, T) bool: which keys each query reads."""
    N, T, _ = x.shape
    H, hd = attn.config.num_attention_heads, attn.head_dim
    Hk = attn.config.num_key_value_heads
    q = attn.q_proj(x).view(N, T, H, hd).transpose(1, 2)
    k = attn.k_proj(x).view(N, T, Hk, hd).transpose(1, 2).repeat_interleave(H // Hk, 1)
    v = attn.v_proj(x).view(N, T, Hk, hd).transpose(1, 2).repeat_interleave(H // Hk, 1)
    q, k = apply_rotary_pos_emb(q, k, cos, sin)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed.unsqueeze(1))
    return out.transpose(1, 2).reshape(N, T, H * hd)


def mlp_activation(mlp, x):
    return mlp.act_fn(mlp.gate_proj(x)) * mlp.up_proj(x)


def _causal(positions: torch.Tensor) -> torch.Tensor:
    """(N, T) true positions -> (N, T, T): a query reads the keys at its position or before."""
    return positions.unsqueeze(-1) >= positions.unsqueeze(-2)


def top_units(scores: torch.Tensor, k: int) -> torch.Tensor:
    return scores.topk(k).indices.sort().values


def adopt(mine: torch.Tensor, theirs: torch.Tensor | None, scores: torch.Tensor, site: str) -> torch.Tensor:
    """My kept units, or theirs where the two differ only by units within TIE of the cut."""
    if theirs is None or torch.equal(mine, theirs.cpu()):
        return mine
    theirs = theirs.cpu()
    order = scores.sort(descending=True).values
    k = len(mine)
    cut = (order[k - 1] + order[k]) / 2 if k < len(order) else order[-1]
    swapped = set(mine.tolist()) ^ set(theirs.tolist())
    far = [u for u in sorted(swapped) if abs(scores[u] - cut) > TIE * abs(cut)]
    assert len(theirs) == k and not far, (
        f"{site}: kept {theirs.tolist()}, by hand {mine.tolist()}; units {far} are far from the cut "
        f"(scores {[round(scores[u].item(), 6) for u in far]}, cut {cut.item():.6f})")
    return theirs


class ByHand:
    """Probe Pruning of a LLaMA-family model by hand (`policy` "pp" with a probe `design`, or
    "full-batch"), with its per-site history between calls, unseeded at first."""

    def __init__(self, model, design="spread", policy="pp", ratio=0.4, skip=(0, 1, 2), multiple=64,
                 momentum=0.99):
        cfg = model.config
        self.model, self.design, self.policy, self.momentum = model, design, policy, momentum
        self.skip = skip
        r_l = layer_ratio(ratio, cfg.num_hidden_layers, len(skip))
        self.kept = {"attention": kept_heads(r_l, cfg.num_attention_heads),
                     "mlp": kept_channels(r_l, cfg.intermediate_size, multiple)}
        self.history: dict[str, torch.Tensor] = {}  # site -> (L, C)
        self.calls, self.seeded = 0, False
        self.adopted = 0  # sites where the pass's near-tie choice was taken

    @torch.no_grad()
    def forward(self, ids, mask=None, position_ids=None, follow: dict | None = None):
        """(logits, kept: site -> units) of one call; `follow`: the pass's selection of this call."""
        m = self.model.model
        B, L = ids.shape
        valid = torch.ones(B, L, dtype=torch.bool) if mask is None else mask.bool()
        if position_ids is None:
            position_ids = torch.arange(L).expand(B, L)
        h = m.embed_tokens(ids)
        cos, sin = m.rotary_emb(h, position_ids)
        # causal, pads never read; a pad query reads itself (its output is never used)
        allowed = (_causal(torch.arange(L).expand(B, L)) & valid.unsqueeze(1)) | torch.eye(L, dtype=torch.bool)
        kept = {}
        for i, layer in enumerate(m.layers):
            for kind in ("attention", "mlp"):
                site = f"model.layers.{i}.{kind}"
                x_res = h
                norm = layer.input_layernorm if kind == "attention" else layer.post_attention_layernorm
                x = norm(x_res)
                if kind == "attention":
                    act, final = attention(layer.self_attn, x, cos, sin, allowed), layer.self_attn.o_proj
                else:
                    act, final = mlp_activation(layer.mlp, x), layer.mlp.down_proj
                if i not in self.skip:
                    def block(xp, c, s, a, layer=layer, kind=kind):
                        return attention(layer.self_attn, xp, c, s, a) if kind == "attention" \
                            else mlp_activation(layer.mlp, xp)
                    energy = self._energy(site, block, x, x_res.norm(dim=-1), valid, act, cos, sin, position_ids)
                    units = self._scores(kind, energy, final.weight, layer.self_attn.head_dim)
                    kept[site] = adopt(top_units(units, self.kept[kind]), (follow or {}).get(site), units, site)
                    self.adopted += not torch.equal(kept[site], top_units(units, self.kept[kind]))
                    channels = self._channels(kind, kept[site], layer.self_attn.head_dim)
                    zero = torch.ones(act.shape[-1], dtype=torch.bool)
                    zero[channels] = False
                    if self.policy == "pp" and self.whole_batch_probes(kind, *x.shape[:2]):
                        self._update(site, torch.arange(act.shape[-1]), act, valid)  # every channel ran
                    act = act.masked_fill(zero, 0.0)
                    if self.policy == "pp" and not self.whole_batch_probes(kind, *x.shape[:2]):
                        self._update(site, channels, act, valid)
                h = x_res + final(act)
        if self.policy == "pp":
            self.seeded |= self.calls > 0
            self.calls += 1
        return self.model.lm_head(m.norm(h)), kept

    def _energy(self, site, block, x, norms, valid, act, cos, sin, position_ids):
        """c_j: the probe's energy per channel, fused with the history (pp) or the whole batch's
        (full-batch: the block's own output, mean over sequences, summed over positions)."""
        sq = torch.where(valid.unsqueeze(-1), act.double().pow(2), 0.0)
        batch_mean = sq.sum(0) / valid.sum(0).clamp(min=1).unsqueeze(-1)  # (L, C): the whole batch's
        if self.policy == "full-batch":
            return batch_mean.sum(0)
        C = act.shape[-1]
        history = self.history.setdefault(site, torch.zeros(0, C, dtype=torch.float64))
        if len(history) < x.shape[1]:  # grown to the longest call, new rows zero
            history = self.history[site] = torch.cat([history, history.new_zeros(x.shape[1] - len(history), C)])
        if self.whole_batch_probes(site.rsplit(".", 1)[-1], *x.shape[:2]):
            return _fuse(batch_mean, history[:x.shape[1]])
        if self.design == "paper":
            rows, pos = paper_probe(norms, valid)
            xp = x[rows][:, pos]
            a = block(xp, cos[rows][:, pos], sin[rows][:, pos], _causal(pos.expand(len(rows), -1)))
            ok = valid[rows][:, pos].unsqueeze(-1)
            P = torch.where(ok, a.double().pow(2), 0.0).sum(0) / ok.sum(0).clamp(min=1)  # (k_t, C)
            return _fuse(P, history[pos])
        P, Hs = [], []
        for b, pos, ok in probe_tokens(self.design, norms, valid):
            a = block(x[b, pos][None], cos[b, pos][None], sin[b, pos][None], _causal(pos[None]))[0]  # (k, C)
            P.append(torch.where(ok.unsqueeze(-1), a.double().pow(2), 0.0))
            Hs.append(torch.where(ok.unsqueeze(-1), history[pos], 0.0))
        return _fuse(torch.cat(P), torch.cat(Hs))

    def whole_batch_probes(self, kind: str, B: int, L: int) -> bool:
        """The probe's share of the B x L tokens is at least the share of the first projections'
        multiply-adds the kept units save (then the block's own activations are the probe): an MLP
        saves its pruned channels' rows of gate and up, a GQA attention (K/V kept whole) its pruned
        heads' rows of q, of q, k and v."""
        k_b, k_t = probe_sizes(self.design, B, L)
        cfg = self.model.config
        if kind == "mlp":
            saved = 1 - self.kept["mlp"] / cfg.intermediate_size
        else:
            H, KV = cfg.num_attention_heads, cfg.num_key_value_heads
            assert KV < H, "by hand: GQA attention only (its K/V stay whole)"
            saved = (H - self.kept["attention"]) / (H + 2 * KV)
        return k_b * k_t / (B * L) >= saved

    @staticmethod
    def _scores(kind, energy, weight, head_dim):
        """PPsp: channel j: c_j * sqrt(sum_i W_ij^4); head: the Frobenius norm of c_j * W_ij^2 over its channels."""
        terms = weight.double().pow(4).sum(0)  # (C,)
        if kind == "mlp":
            return energy * terms.sqrt()
        return (energy.pow(2) * terms).view(-1, head_dim).sum(-1).sqrt()

    @staticmethod
    def _channels(kind, kept, head_dim):
        return kept if kind == "mlp" else (kept[:, None] * head_dim + torch.arange(head_dim)).flatten()

    def _update(self, site, channels, act, valid):
        """H[t, j] <- H + w * (mean_b x^2 - H) for `channels` (the kept ones; every one where the
        block's own activations selected) at positions with a real token;
        w = 0 on the warm-up call, 1 into an unseeded history, else 1 - momentum."""
        w = 0.0 if self.calls == 0 else (1 - self.momentum) if self.seeded else 1.0
        sq = torch.where(valid.unsqueeze(-1), act.double().pow(2), 0.0)  # (B, L, C)
        mean = sq.sum(0) / valid.sum(0).clamp(min=1).unsqueeze(-1)  # (L, C)
        present = valid.any(0)
        H = self.history[site]
        L = act.shape[1]
        old = H[:L, channels]
        H[:L, channels] = torch.where(present.unsqueeze(-1), old + w * (mean[:, channels] - old), old)


def _fuse(P: torch.Tensor, Hs: torch.Tensor) -> torch.Tensor:
    """c_j = sum_t alpha P + (1 - alpha) H, alpha = P / (P + H + eps)."""
    alpha = P / (P + Hs + EPS)
    return (alpha * P + (1 - alpha) * Hs).sum(0)


# ---- the static baselines (ALGORITHM.md, "Baselines") ----
def finals(model) -> dict:
    """site -> (final projection, unit width): o_proj (a head: head_dim columns), down_proj (1)."""
    out = {}
    for i, layer in enumerate(model.model.layers):
        out[f"model.layers.{i}.attention"] = (layer.self_attn.o_proj, layer.self_attn.head_dim)
        out[f"model.layers.{i}.mlp"] = (layer.mlp.down_proj, 1)
    return out


@torch.no_grad()
def calibration_stats(model, batches) -> dict:
    """Dense passes: per site, S_j = sum over positions of the mean of x^2, mu_j and V_j over all
    tokens, x the final projection's input (float64)."""
    sums: dict = {}

    def record(site):
        def hook(module, args):
            x = args[0].double()  # (B, L, C)
            s = sums.setdefault(site, {"sq": 0, "n": 0, "total": 0, "total_sq": 0})
            s["sq"] = s["sq"] + x.pow(2).sum(0)  # (L, C)
            s["n"] += x.shape[0]
            s["total"] = s["total"] + x.sum((0, 1))
            s["total_sq"] = s["total_sq"] + x.pow(2).sum((0, 1))
        return hook

    hooks = [final.register_forward_pre_hook(record(site)) for site, (final, _) in finals(model).items()]
    try:
        for ids in batches:
            model(ids)
    finally:
        for h in hooks:
            h.remove()
    stats = {}
    for site, s in sums.items():
        tokens = s["n"] * s["sq"].shape[0]
        mu = s["total"] / tokens
        stats[site] = {"energy": (s["sq"] / s["n"]).sum(0), "mean": mu, "variance": s["total_sq"] / tokens - mu ** 2}
    return stats


def static_kept(model, stats, policy: str, ratio=0.4, skip=(0, 1, 2), multiple=64) -> dict:
    """site -> kept units of wanda-sp (uniform counts) or FLAP (one global threshold)."""
    cfg = model.config
    r_l = layer_ratio(ratio, cfg.num_hidden_layers, len(skip))
    scores, cost, uniform = {}, {}, {}
    d = cfg.hidden_size
    for site, (final, unit) in finals(model).items():
        if int(site.split(".")[2]) in skip:
            continue
        W = final.weight.double()
        if policy == "wanda-sp":
            s = W.abs().sum(0) * stats[site]["energy"].sqrt()
            scores[site] = s.view(-1, unit).sum(-1)
        else:
            s = stats[site]["variance"] * W.pow(2).sum(0)
            z = (s - s.mean()) / s.std(unbiased=False)
            scores[site] = z.view(-1, unit).mean(-1)
        attn = unit > 1
        # FLOPs per token of a unit: a head's Q rows and O columns (GQA: K/V stay whole); a channel's gate, up and down
        cost[site] = unit * (d + d) if attn else 3 * d
        uniform[site] = kept_heads(r_l, len(scores[site])) if attn else kept_channels(r_l, len(scores[site]), multiple)
    if policy == "wanda-sp":
        return {site: top_units(s, uniform[site]) for site, s in scores.items()}
    target = r_l * sum(len(s) * cost[site] for site, s in scores.items())
    units = sorted((v.item(), site, j) for site, s in scores.items() for j, v in enumerate(s))
    pruned, left = 0.0, {site: set(range(len(s))) for site, s in scores.items()}
    for _, site, j in units:
        if pruned >= target:
            break
        if len(left[site]) > 1:
            left[site].discard(j)
            pruned += cost[site]
    return {site: torch.tensor(sorted(k)) for site, k in left.items()}


@contextlib.contextmanager
def static_pruned(model, kept: dict, stats: dict | None = None):
    """Within: the final projections read zeros in the pruned units' input channels; with
    `stats`, FLAP's bias compensation W[:, pruned] @ mu[pruned] is added to their output."""
    hooks = []
    for site, units in kept.items():
        final, unit = finals(model)[site]
        pruned = torch.ones(final.weight.shape[1], dtype=torch.bool)
        pruned[(units[:, None] * unit + torch.arange(unit)).flatten()] = False
        hooks.append(final.register_forward_pre_hook(lambda m, a, pruned=pruned: (a[0].masked_fill(pruned, 0.0),)))
        if stats is not None:
            comp = (final.weight.double()[:, pruned] @ stats[site]["mean"][pruned]).to(final.weight.dtype)
            hooks.append(final.register_forward_hook(lambda m, a, out, comp=comp: out + comp))
    try:
        yield model
    finally:
        for h in hooks:
            h.remove()
