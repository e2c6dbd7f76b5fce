"""Wrong selections, to show that the by-hand checks fail on them: every top-k the pass and the
static baselines make, replaced by the lowest scores, or by the right units shifted by one."""
import torch

from ppcompile import baselines, ops


def _lowest(scores, k, groups=1):
    per = scores.shape[-1] // groups
    local = torch.topk(scores.view(groups, per), k // groups, largest=False).indices.sort(-1).values
    return (local + torch.arange(groups, device=scores.device)[:, None] * per).flatten()


def _shifted(scores, k, groups=1):
    return ((_RIGHT(scores, k, groups) + 1) % scores.shape[-1]).sort().values


_RIGHT = ops.top_indices
MUTANTS = {"lowest": _lowest, "shifted": _shifted}


def mutate(monkeypatch, name: str) -> None:
    """Every selection the pass (and the static baselines) makes from now on, mutated."""
    monkeypatch.setattr(ops, "top_indices", MUTANTS[name])
    monkeypatch.setattr(baselines, "top_indices", MUTANTS[name])
