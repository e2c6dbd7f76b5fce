"""Evaluation harness: perplexity, KL and top-1 agreement to dense, and wall time per batch.

Every method sees the same batches in the same order, interleaved batch by batch, so that the
reference logits of one batch are computed once and timing noise of the machine falls on all
methods alike. Memory is bounded by one batch: no run ever holds more than one batch's logits
per method.
"""
from __future__ import annotations

import math
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from typing import Callable, Iterable, Mapping

import torch

from .inputs import check_batch

Batch = torch.Tensor | Mapping[str, torch.Tensor]
LogitsFn = Callable[..., torch.Tensor]


@dataclass
class MethodResult:
    method: str
    ppl: float
    kl: float | None  # mean KL(reference || method) per predicted token; None without a reference
    top1: float | None  # fraction of predicted tokens whose argmax equals the reference's
    seconds_per_batch: float  # median over timed batches
    seconds_spread: tuple[float, float]  # (min, max) over timed batches
    tokens_per_second: float
    batches: int
    tokens: int  # predicted tokens scored

    def as_dict(self) -> dict:
        return asdict(self)


def model_logits_fn(model: torch.nn.Module) -> LogitsFn:
    """Wrap a Hugging Face causal LM (or anything returning `.logits`) as a logits function."""

    def run(input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        out = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        return out.logits if hasattr(out, "logits") else out

    return run


def unpack_batch(batch: Batch, index: int | None = None, label: str = "batch"
                 ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(input_ids, attention_mask or None), checked before the batch runs: a string, a list, float
    ids or a 1-D tensor is an error naming the batch (see inputs.check_batch)."""
    return check_batch(batch, index, label)


def _timed(fn: LogitsFn, ids: torch.Tensor, mask: torch.Tensor | None) -> tuple[torch.Tensor, float]:
    start = time.perf_counter()
    logits = fn(ids, mask) if mask is not None else fn(ids)
    return logits, time.perf_counter() - start


class _Tally:
    """Running sums for one method; nothing per token is kept."""

    def __init__(self) -> None:
        self.nll = 0.0
        self.kl = 0.0
        self.agree = 0
        self.tokens = 0
        self.processed = 0  # input tokens run through the model in timed calls
        self.times: list[float] = []


def _score(logits: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor | None,
           ref_logprobs: torch.Tensor | None, tally: _Tally) -> None:
    logprobs = torch.log_softmax(logits[:, :-1].float(), dim=-1)  # (B, L-1, V)
    targets = ids[:, 1:]  # (B, L-1)
    keep = torch.ones_like(targets, dtype=torch.bool) if mask is None else mask[:, 1:].bool()
    nll = -logprobs.gather(-1, targets.unsqueeze(-1)).squeeze(-1)  # (B, L-1)
    tally.nll += nll[keep].double().sum().item()
    tally.tokens += int(keep.sum())
    if ref_logprobs is not None:
        kl = (ref_logprobs.exp() * (ref_logprobs - logprobs)).sum(-1)  # (B, L-1)
        tally.kl += kl[keep].double().sum().item()
        tally.agree += int((logprobs.argmax(-1) == ref_logprobs.argmax(-1))[keep].sum())


def evaluate(methods: Mapping[str, LogitsFn], batches: Iterable[Batch], *,
             reference: str | None = "dense", warmup: bool = True,
             progress: bool = False) -> list[MethodResult]:
    """Evaluate every method on the same batches.

    `methods` maps a name to a function `(input_ids[, attention_mask]) -> logits (B, L, V)`.
    `reference` names the method whose next-token distribution KL and top-1 are measured
    against (None: no KL/top-1). With `warmup`, each method first runs the first batch once,
    untimed and unscored (it compiles, allocates and, for Probe Pruning, is the warm-up batch).
    """
    if reference is not None and reference not in methods:
        raise ValueError(f"reference method {reference!r} is not among the methods {list(methods)}")
    order = ([reference] if reference else []) + [m for m in methods if m != reference]
    tallies = {name: _Tally() for name in order}
    with torch.no_grad():
        for i, batch in enumerate(batches):
            ids, mask = unpack_batch(batch, i)
            if i == 0 and warmup:
                for name in order:
                    log_progress(progress, f"warm-up: {name}")
                    _timed(methods[name], ids, mask)
            ref_logprobs = None
            for name in order:
                logits, seconds = _timed(methods[name], ids, mask)
                tallies[name].times.append(seconds)
                tallies[name].processed += ids.numel()
                _score(logits, ids, mask, ref_logprobs, tallies[name])
                if name == reference:
                    ref_logprobs = torch.log_softmax(logits[:, :-1].float(), dim=-1)
                del logits
                log_progress(progress, f"batch {i + 1}: {name} {seconds:.2f}s")
            del ref_logprobs
    return [_result(name, tallies[name], ref=reference) for name in order]


def _result(name: str, t: _Tally, ref: str | None) -> MethodResult:
    if not t.times or t.tokens == 0:
        raise ValueError("no batches were evaluated: the batch iterable was empty")
    median = statistics.median(t.times)
    scored = ref is not None
    if name == ref:  # the reference against itself: exactly 0 and 1, no need to compute
        t.kl, t.agree = 0.0, t.tokens
    return MethodResult(
        method=name,
        ppl=math.exp(t.nll / t.tokens),
        kl=t.kl / t.tokens if scored else None,
        top1=t.agree / t.tokens if scored else None,
        seconds_per_batch=median,
        seconds_spread=(min(t.times), max(t.times)),
        tokens_per_second=t.processed / len(t.times) / median,
        batches=len(t.times),
        tokens=t.tokens,
    )


def continuation_nll(model, ids: torch.Tensor, prompt: int, *, whole: bool = False) -> tuple[float, int]:
    """(summed NLL, tokens) of ids[:, prompt:] given the rest, as generation sees them: the first
    `prompt` tokens are a prefill into an empty static cache (a ppcompile model selects there), the
    rest run teacher-forced in one call on that cache (a ppcompile model decodes with the prefill's
    selection). `whole`: one forward over the whole window instead (the oracle selects from all of
    it). No padding: every window is full."""
    from transformers import StaticCache
    if whole:
        logits = model(ids, use_cache=False).logits[:, prompt - 1:-1]
    else:
        cache = StaticCache(config=model.config, max_cache_len=ids.shape[1])
        first = model(ids[:, :prompt], cache=cache).logits[:, -1:]  # predicts ids[:, prompt]
        logits = torch.cat([first, model(ids[:, prompt:-1], cache=cache).logits], 1)
    targets = ids[:, prompt:]  # (B, L - prompt)
    nll = -torch.log_softmax(logits.float(), -1).gather(-1, targets.unsqueeze(-1))
    return nll.double().sum().item(), targets.numel()


def log_progress(enabled: bool, message: str) -> None:
    if enabled:
        print(f"[ppcompile] {message}", file=sys.stderr, flush=True)
