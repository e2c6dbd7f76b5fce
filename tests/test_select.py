"""Selection builders, registered by policy class, and probe token builders, by design class.

Each extension below is what a user writes in their own file: one class and one registered
function, touching nothing in ppcompile. Their kept units and logits are checked against the
dense model computed here by hand.
"""
from __future__ import annotations

import pytest
import torch

import ppcompile as pp
from ppcompile import ops
from ppcompile.models import random_model
from ppcompile.passes.graph import call
from ppcompile.passes.probe import PER_SEQUENCE, probe_tokens, selected_tokens, token_builder
from ppcompile.passes.select import SELECTORS, Selection, first_projection, register_selector, selector_for, tag_of
from ppcompile.policies import Policy, ProbePruning
from ppcompile.probes import ProbeDesign

OPTIONS = dict(backend="eager", skip_layers=(0,), mlp_multiple=16, history=False)


# ---- a new dynamic policy: the units whose final-projection columns are largest ----
class LargestColumns(Policy):
    name = "largest-columns"


@register_selector(LargestColumns)
def largest_columns(ctx, site, history):
    g, tag, anchor = ctx.g, tag_of(site), first_projection(site)
    with g.inserting_before(anchor):
        terms = call(g, ops.column_terms, site.final.args[1], name=f"{tag}_terms")  # (C,) sum_i W_ij^4
        scores = call(g, _per_unit, terms, site.units, name=f"{tag}_score")
        kept = call(g, ops.top_indices, scores, site.kept, name=f"{tag}_select")
    return Selection(kept, anchor)


def _per_unit(terms: torch.Tensor, units: int) -> torch.Tensor:
    return terms.view(units, -1).sum(-1)  # (units,): a head's channels summed, or each channel


# ---- a new probe design: every sequence at its last two tokens ----
class LastTwo(ProbeDesign):
    name = "last-two"


def _every_row_two(ctx, site, tag):
    return ctx.gi.batch_arg, 2


@probe_tokens(LastTwo, layout=PER_SEQUENCE, counts=_every_row_two)
def last_two(ctx, site, design, x_res, tag):
    return selected_tokens(ctx, _last_two_positions, x_res, *_every_row_two(ctx, site, tag), tag)


def _last_two_positions(x_res: torch.Tensor, valid, k_t):
    B, L = x_res.shape[:2]
    positions = torch.arange(L - k_t, L, device=x_res.device).expand(B, k_t)  # (B, 2): no padding here
    return torch.arange(B, device=x_res.device), positions, torch.ones_like(positions, dtype=torch.bool)


def _ids(seed=0):
    return torch.randint(0, 128, (3, 12), generator=torch.Generator().manual_seed(seed))


def _kept_counts(model) -> dict[str, int]:
    return {r["site"]: r["kept"] for r in model.pp.summary() if r["reason"] is None}


def _zero_unkept(model, kept: dict[str, torch.Tensor]) -> None:
    """The dense model with every unit a site did not keep zeroed in its final projection."""
    for site, idx in kept.items():
        layer = model.model.layers[int(site.split(".")[-2])]
        final = layer.self_attn.o_proj if site.endswith("attention") else layer.mlp.down_proj
        unit = model.config.head_dim if site.endswith("attention") else 1
        drop = torch.ones(final.weight.shape[1] // unit, dtype=torch.bool)
        drop[idx] = False
        final.weight.data[:, drop.repeat_interleave(unit)] = 0.0


def test_a_new_policy_is_one_class_and_one_registered_builder():
    model = random_model("llama-gqa")
    c = pp.compile(model, 0.4, policy=LargestColumns(), **OPTIONS)
    with torch.no_grad():
        out = c(_ids()).logits
    kept, counts = model.pp.runtime.last_selection(), _kept_counts(model)
    assert set(kept) == set(counts) and len(kept) == 2 * (model.config.num_hidden_layers - 1)
    for site, idx in kept.items():  # by hand: the largest sum_i W_ij^4, per head or channel
        layer = model.model.layers[int(site.split(".")[-2])]
        w = (layer.self_attn.o_proj if site.endswith("attention") else layer.mlp.down_proj).weight
        unit = model.config.head_dim if site.endswith("attention") else 1
        per_unit = w.detach().double().pow(4).sum(0).view(-1, unit).sum(-1)  # (heads,) or (channels,)
        assert counts[site] < len(per_unit)
        assert idx.tolist() == per_unit.topk(counts[site]).indices.sort().values.tolist(), site
    _zero_unkept(model, kept)
    with torch.no_grad():
        dense = model(_ids()).logits
    torch.testing.assert_close(out, dense, rtol=1e-4, atol=1e-4)


def test_a_new_probe_design_is_one_class_and_one_registered_token_builder():
    model = random_model("llama-gqa")
    down = model.model.layers[0].mlp.down_proj
    seen = []
    hook = down.register_forward_pre_hook(lambda m, args: seen.append(args[0].detach()))
    with torch.no_grad():
        model(_ids())  # the dense model: layer 0's MLP input is the pruned model's (its attention stays dense)
    hook.remove()
    c = pp.compile(model, 0.4, probe=LastTwo(), **{**OPTIONS, "skip_layers": ()}, blocks="mlp")
    with torch.no_grad():
        c(_ids())
    site = "model.layers.0.mlp"
    k = _kept_counts(model)[site]
    act = seen[0][:, -2:].double()  # (B, 2, I): the probe's tokens
    scores = act.pow(2).sum((0, 1)) * down.weight.detach().double().pow(4).sum(0).sqrt()  # PPsp
    assert 0 < k < len(scores)
    assert model.pp.runtime.last_selection()[site].tolist() == scores.topk(k).indices.sort().values.tolist()


def test_builders_are_found_by_class_and_inherited_by_subclasses():
    class MyPP(ProbePruning):
        name = "my-pp"

    assert selector_for(MyPP()) is SELECTORS[ProbePruning] and not selector_for(MyPP()).fixed
    assert token_builder(LastTwo())[1] is PER_SEQUENCE


def test_a_policy_or_design_without_a_builder_is_refused_naming_the_fix():
    class Unbuilt(Policy):
        name = "unbuilt"

    class NoTokens(ProbeDesign):
        name = "no-tokens"

    model = random_model("llama-gqa")
    with pytest.raises(Exception, match="policy <policy unbuilt> has no selection builder: register one"):
        pp.compile(model, 0.4, policy=Unbuilt(), **OPTIONS)(_ids())
    with pytest.raises(ValueError, match="probe design <probe no-tokens> has no token builder"):
        token_builder(NoTokens())
