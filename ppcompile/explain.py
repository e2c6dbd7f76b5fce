"""pp.explain: what the pass would do to a model on given inputs, without changing the model."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .calibration import resolve
from .config import PPConfig
from .flops import graph_flops
from .passes.graph import real_tensors
from .passes.probe_prune import run_pass
from .report import format_rows, left_dense_unmatched, site_rows
from .runtime import Runtime


@dataclass
class Explanation:
    config: PPConfig
    rows: list[dict] = field(default_factory=list)  # every site, as model.pp.summary()
    flops: dict[str, int] = field(default_factory=dict)  # dense, pruned (probe included), probe
    graphs: int = 0

    @property
    def unmatched(self) -> list[dict]:
        return [r for r in self.rows if left_dense_unmatched(r)]

    def __str__(self) -> str:
        f = self.flops
        pruned = sum(r["reason"] is None for r in self.rows)
        lines = [format_rows(self.rows), "",
                 f"policy {self.config.policy}, ratio {self.config.ratio}: {pruned} blocks pruned, "
                 f"{len(self.unmatched)} left dense that could not be matched, {self.graphs} graph(s)"]
        if f.get("dense"):
            lines.append(f"FLOPs per call: dense {f['dense'] / 1e9:.3f} G, pruned {f['pruned'] / 1e9:.3f} G "
                         f"({f['pruned'] / f['dense']:.3f} of dense), of which the probe "
                         f"{f['probe'] / 1e9:.4f} G ({f['probe'] / f['dense']:.2%} of dense)")
        return "\n".join(lines)


def explain(model: torch.nn.Module, inputs, ratio: float = 0.4, *, policy: str = "pp",
            calibration=None, **options) -> Explanation:
    """Run `model` once on `inputs` (a token tensor or a dict of keyword arguments) as it is, and
    report what pp.compile with the same arguments would do: every site with its kept count or why
    it stays dense, and the FLOPs per call before and after (counted by torch's FlopCounterMode on
    the rewritten graph, the probe apart). The model itself is not changed."""
    config = PPConfig.from_options({"ratio": ratio, "policy": policy, **options})
    base = getattr(model, "_orig_mod", model)
    if calibration is not None:
        calibration = resolve(calibration, base)
    explanation = Explanation(config)

    def backend(gm, example_inputs):
        result = run_pass(gm, config, calibration=calibration, real=real_tensors(gm, example_inputs))
        explanation.graphs += 1
        explanation.rows += site_rows(result)
        if result.sites:
            state = result.seam.state(example_inputs, Runtime().provide)
            dense = graph_flops(gm, list(example_inputs))["total"]
            pruned = graph_flops(result.gm, list(example_inputs) + state)
            for key, v in (("dense", dense), ("pruned", pruned["total"]), ("probe", pruned["probe"])):
                explanation.flops[key] = explanation.flops.get(key, 0) + v
        return gm.forward  # the model runs as it is

    compiled = torch.compile(base, backend=backend, dynamic=False)
    with torch.no_grad():
        compiled(**inputs) if isinstance(inputs, dict) else compiled(inputs)
    return explanation
