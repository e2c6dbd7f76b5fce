"""PPConfig: every knob of the method, with the paper's defaults, validated once."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

POLICIES = ("pp", "full-batch", "wanda-sp", "flap", "dense")
STATIC_POLICIES = ("wanda-sp", "flap")  # indices fixed once from calibration statistics
BLOCKS = ("both", "attention", "mlp")


@dataclass(frozen=True)
class PPConfig:
    ratio: float = 0.4  # fraction of the model pruned (skipped layers count as 0%)
    policy: str = "pp"
    position_ratio: float = 0.5  # probe: fraction of sequence positions kept
    sample_ratio: float = 0.05  # probe: fraction of batch samples kept
    sequence_first: bool = True  # select positions before samples (the paper's order)
    skip_layers: tuple[int, ...] = (0, 1, 2)  # decoder layers left dense
    blocks: str = "both"  # which blocks are pruned: both | attention | mlp
    mlp_multiple: int = 64  # kept MLP channels rounded up to a multiple of this
    momentum: float = 0.99  # EMA momentum of the history
    strict: bool = False  # an unmatched block is an error instead of a warning
    telemetry: bool = False  # record per call and site what was kept (runtime.stats())

    def __post_init__(self) -> None:
        object.__setattr__(self, "skip_layers", tuple(sorted(set(int(i) for i in self.skip_layers))))
        if not 0.0 <= self.ratio < 1.0:
            raise ValueError(f"ratio must be in [0, 1), got {self.ratio}")
        if self.policy not in POLICIES:
            raise ValueError(f"unknown policy {self.policy!r}; known policies: {', '.join(POLICIES)}")
        if self.blocks not in BLOCKS:
            raise ValueError(f"blocks must be one of {', '.join(BLOCKS)}, got {self.blocks!r}")
        for name in ("position_ratio", "sample_ratio"):
            value = getattr(self, name)
            if not 0.0 < value <= 1.0:
                raise ValueError(f"{name} must be in (0, 1], got {value}")
        if not 0.0 <= self.momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {self.momentum}")
        if self.mlp_multiple < 1:
            raise ValueError(f"mlp_multiple must be >= 1, got {self.mlp_multiple}")

    @classmethod
    def from_options(cls, options: dict | None) -> "PPConfig":
        """Build from torch.compile's `options` dict; an unknown key is an error, not ignored."""
        options = dict(options or {})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise ValueError(f"unknown ppcompile option(s) {unknown}; known: {', '.join(sorted(known))}")
        return cls(**options)

    def as_dict(self) -> dict:
        return asdict(self)

    # ---- kept counts: Python ints, so every shape in the rewritten graph is static ----
    def layer_ratio(self, n_layers: int) -> float:
        """The ratio of each pruned layer: skipped layers count as 0%, so the rest prune more
        (at most all of it: see `unreachable`)."""
        return min(self._scaled_ratio(n_layers), 1.0)

    def unreachable(self, n_layers: int) -> str | None:
        """Why `ratio` cannot be reached on `n_layers` layers, or None when it can."""
        scaled = self._scaled_ratio(n_layers)
        if scaled <= 1.0:
            return None
        n_pruned = self._pruned_layers(n_layers)
        return (f"ratio {self.ratio} cannot be reached with {n_pruned} of {n_layers} layers pruned: each would "
                f"prune {scaled:.0%}; they keep one head and {self.mlp_multiple} MLP channels instead, so the "
                "model prunes less than asked (lower the ratio or skip fewer layers)")

    def _pruned_layers(self, n_layers: int) -> int:
        return n_layers - len([i for i in self.skip_layers if i < n_layers])

    def _scaled_ratio(self, n_layers: int) -> float:
        n_pruned = self._pruned_layers(n_layers)
        if n_pruned <= 0 or self.ratio == 0:
            return 0.0
        return round(self.ratio * n_layers / n_pruned, 2)

    def kept_heads(self, n_heads: int, n_layers: int) -> int:
        """Heads pruned: floor(r_l * H); at least one head is kept."""
        return max(1, n_heads - math.floor(self.layer_ratio(n_layers) * n_heads))

    def kept_channels(self, n_channels: int, n_layers: int) -> int:
        """Channels pruned: floor(r_l * C); the kept count is rounded up to the multiple (>= 1)."""
        kept = max(1, n_channels - math.floor(self.layer_ratio(n_layers) * n_channels))
        return min(n_channels, math.ceil(kept / self.mlp_multiple) * self.mlp_multiple)

    def probe_positions(self, seq_len: int) -> int:
        return min(seq_len, max(math.ceil(self.position_ratio * seq_len), 2))

    def probe_samples(self, batch: int) -> int:
        return min(batch, max(math.ceil(self.sample_ratio * batch), 1))
