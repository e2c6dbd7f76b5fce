"""Checks of what users hand in: calibration and evaluation batches, and the calls of a compiled
model. They run before any forward pass, so a wrong input is one error that names the fix, not a
shape error from deep inside a traced graph (or, worse, a silently wrong result). Every check reads
shapes and dtypes only: nothing here touches tensor data."""
from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch

EXPECTED = "expected a LongTensor (batch, seq) of token ids or a dict with 'input_ids' (and 'attention_mask')"
ID_DTYPES = (torch.long, torch.int32)  # what nn.Embedding takes
TRAINING = ("ppcompile prunes inference only: call model.eval() and run under torch.no_grad() / "
            "torch.inference_mode() (training through a pruned model is not supported)")


def _kind(value) -> str:
    """'a str', 'an int': the type of what a message says it got."""
    name = type(value).__name__
    return f"{'an' if name[0].lower() in 'aeiou' else 'a'} {name}"


def _shape(t: torch.Tensor) -> tuple[int, ...]:
    return tuple(t.shape)


# ---- batches (calibration, evaluation) ----
def check_batches(batches, label: str = "calibration batches") -> None:
    """`batches` must be an iterable of batches, not one batch: iterating a (B, L) tensor gives its
    rows, a dict its keys and a string its characters, each of which would fail later, or worse,
    run as a batch of its own."""
    fix = None
    if isinstance(batches, (str, bytes)):
        fix = "tokenize the text first, e.g. [tokenizer(texts, return_tensors='pt', padding=True)]"
    elif isinstance(batches, torch.Tensor):
        fix = (f"iterating a tensor of shape {_shape(batches)} gives its rows: pass [ids] for one batch, "
               "or list(ids.split(8)) for batches of 8 rows")
    elif isinstance(batches, Mapping):
        fix = "a dict is one batch (iterating it gives its keys): pass [batch]"
    elif not isinstance(batches, Iterable):
        fix = "pass a list of batches"
    if fix:
        raise TypeError(f"{label} must be a list (or any iterable) of batches, got {_kind(batches)}: {fix}")


def check_batch(batch, index: int | None = None, label: str = "calibration batch"
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(input_ids, attention_mask or None) of one batch: a (B, L) integer tensor or a dict (or a
    tokenizer's BatchEncoding) with `input_ids` and optionally `attention_mask` of the same shape."""
    name = label if index is None else f"{label} {index}"
    if isinstance(batch, Mapping):
        if "input_ids" not in batch:
            raise ValueError(f"{name} is a dict without 'input_ids' (keys: {sorted(map(str, batch))}); {EXPECTED}")
        ids, mask = batch["input_ids"], batch.get("attention_mask")
    else:
        ids, mask = batch, None
    if not isinstance(ids, torch.Tensor):
        hint = {str: ": tokenize it first, e.g. tokenizer(texts, return_tensors='pt', padding=True)",
                list: ": make it a tensor, e.g. torch.tensor([ids])", tuple: ": make it a tensor"}
        raise TypeError(f"{name} is {_kind(ids)}; {EXPECTED}{hint.get(type(ids), '')}")
    if ids.dtype not in ID_DTYPES:
        raise TypeError(f"{name} is a {ids.dtype} tensor; {EXPECTED}: token ids are integers (.long() if these "
                        "are ids)")
    if ids.dim() != 2:
        fix = "add the batch dim with ids.unsqueeze(0)" if ids.dim() == 1 else "one row of token ids per sequence"
        raise ValueError(f"{name} has shape {_shape(ids)}; {EXPECTED}: {fix}")
    if ids.numel() == 0:
        raise ValueError(f"{name} is empty (shape {_shape(ids)}); {EXPECTED}, with at least one token")
    if mask is not None:
        if not isinstance(mask, torch.Tensor):
            raise TypeError(f"{name}'s attention_mask is {_kind(mask)}; expected a tensor of input_ids' shape")
        if mask.shape != ids.shape:
            raise ValueError(f"{name}'s attention_mask has shape {_shape(mask)} but its input_ids {_shape(ids)}: "
                             "one mask entry per token (1 keeps it, 0 masks padding)")
    return ids, mask


# ---- calls of a compiled model ----
def check_call(args: tuple, kwargs: dict, *, max_positions: int | None = None) -> list[str]:
    """Check a compiled causal LM's call `model(*args, **kwargs)` before it runs; return warnings
    (the caller warns once). input_ids is read from args[0] or kwargs, attention_mask from kwargs
    only (its position differs between models). With a cache (`past_key_values` / `cache`), the
    mask may be longer than input_ids (it covers the cached tokens too); a 4-D mask is custom and
    left to the model. A sequence longer than `max_positions` is a warning, not an error: models
    whose rope is scaled go past it on purpose."""
    ids = kwargs.get("input_ids", args[0] if args else None)
    embeds = kwargs.get("inputs_embeds")
    if ids is not None and embeds is not None:
        raise ValueError("the compiled model got both input_ids and inputs_embeds: pass one of them")
    if ids is None and embeds is None:
        raise ValueError("the compiled model got neither input_ids nor inputs_embeds: call it with token ids, "
                         "e.g. model(input_ids) or model(**tokenizer(texts, return_tensors='pt'))")
    batch, seq = _check_ids(ids) if ids is not None else _check_embeds(embeds)
    mask = kwargs.get("attention_mask")
    cached = any(kwargs.get(k) is not None for k in ("past_key_values", "cache"))
    _check_mask(mask, batch, seq, cached)
    tokens = mask.shape[-1] if cached and isinstance(mask, torch.Tensor) and mask.dim() == 2 else seq
    if max_positions is not None and tokens > max_positions:
        return [f"input of {tokens} tokens is longer than the model's max_position_embeddings ({max_positions}): "
                "positions past it were not trained unless the model scales its rope for them, so expect worse "
                "predictions; pass shorter inputs to stay within it"]
    return []


def _check_ids(ids) -> tuple[int, int]:
    if not isinstance(ids, torch.Tensor):
        fix = ("unpack it: model(**batch)" if isinstance(ids, Mapping)
               else "e.g. tokenizer(texts, return_tensors='pt').input_ids")
        raise TypeError(f"input_ids must be a tensor of token ids (batch, seq), got {_kind(ids)}: {fix}")
    if ids.dtype not in ID_DTYPES:
        raise TypeError(f"input_ids must be integer token ids (torch.long), got {ids.dtype}: token ids come from "
                        "a tokenizer (return_tensors='pt'); embeddings go in inputs_embeds=")
    if ids.dim() != 2:
        fix = "add the batch dim with input_ids.unsqueeze(0)" if ids.dim() == 1 else "one row of ids per sequence"
        raise ValueError(f"input_ids must be (batch, seq), got shape {_shape(ids)}: {fix}")
    _check_not_empty("input_ids", ids)
    return ids.shape[0], ids.shape[1]


def _check_embeds(embeds) -> tuple[int, int]:
    if not isinstance(embeds, torch.Tensor) or not embeds.is_floating_point():
        got = embeds.dtype if isinstance(embeds, torch.Tensor) else _kind(embeds)
        raise TypeError(f"inputs_embeds must be a float tensor (batch, seq, hidden), got {got}: token ids go "
                        "in input_ids")
    if embeds.dim() != 3:
        raise ValueError(f"inputs_embeds must be (batch, seq, hidden), got shape {_shape(embeds)}")
    _check_not_empty("inputs_embeds", embeds)
    return embeds.shape[0], embeds.shape[1]


def _check_not_empty(name: str, t: torch.Tensor) -> None:
    if t.numel() == 0:
        raise ValueError(f"{name} is empty (shape {_shape(t)}): pass at least one sequence of at least one token")


def _check_mask(mask, batch: int, seq: int, cached: bool) -> None:
    if mask is None:
        return
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"attention_mask must be a tensor (batch, seq) like input_ids, got {_kind(mask)}")
    if mask.dim() == 4:  # a custom (batch, heads, query, key) mask: the model checks it
        return
    ok = mask.dim() == 2 and mask.shape[0] == batch and (mask.shape[1] >= seq if cached else mask.shape[1] == seq)
    if not ok:
        covers = "batch and at least the tokens of" if cached else "shape of"
        raise ValueError(f"attention_mask has shape {_shape(mask)} but input_ids ({batch}, {seq}): it needs the "
                         f"{covers} input_ids, one entry per token (1 keeps it, 0 masks padding)")


def check_training(training: bool) -> None:
    """Refuse a model in train mode: the pruned graph keeps per batch the heads and channels that
    batch's probe chose, which back-propagation cannot account for, and dropout would run inside
    it. Only `model.training` decides, not torch.is_grad_enabled(): calling an eval-mode model
    with gradients on (a notebook without no_grad) is common and is left alone."""
    if training:
        raise RuntimeError(TRAINING)
