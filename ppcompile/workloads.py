"""What `ppcompile eval` runs, for the CLI and the benches alike: a model loaded for a window
length (`load`), evaluation windows with a disjoint calibration (`windows_and_calibration`), the
methods evaluated on them as rows (`run_eval`), and the machine a row names (`device_name`)."""
from __future__ import annotations

import hashlib
import json
import platform
import time
from pathlib import Path

import torch

from . import cache, data, models
from .calibration import Calibration, collect, fingerprint
from .evaluate import MethodResult, evaluate
from .methods import RATIO_FREE, build_method, label
from .policies import POLICIES


def _check_seq_len(seq_len: int, limit: int | None) -> None:
    """Windows longer than the model's positions would evaluate positions it was never trained on."""
    if limit is not None and seq_len > limit:
        raise ValueError(f"--seq-len {seq_len} is longer than the model's max_position_embeddings ({limit}): "
                         f"pass a smaller --seq-len (at most {limit})")


def _check_seq_len_early(model_name: str, seq_len: int) -> None:
    """For a local checkpoint folder, its config.json alone (no weights) tells the limit: refuse
    before loading; other models are checked right after loading (_check_seq_len)."""
    path = Path(model_name).expanduser() / "config.json"
    try:
        limit = json.loads(path.read_text()).get("max_position_embeddings")
    except (OSError, ValueError, AttributeError):  # no folder, no such file, not a JSON object
        return
    _check_seq_len(seq_len, limit if isinstance(limit, int) else None)


def load(model_name: str, seq_len: int, dtype: torch.dtype = torch.float32):
    """(model, tokenizer) of `model_name` (a known name or a local checkpoint folder, see
    models.load_model) in `dtype`, refusing a `seq_len` past the model's positions (ValueError)
    before any pass runs: a local folder's before its weights load."""
    _check_seq_len_early(model_name, seq_len)
    model, tokenizer = models.load_model(model_name, dtype=dtype)
    _check_seq_len(seq_len, getattr(model.config, "max_position_embeddings", None))
    return model, tokenizer


def windows_and_calibration(model, tokenizer, text: str, seq_len: int, n_windows: int, batch_size: int,
                            calibration: str | None, calibration_windows: int, seed: int, progress: bool,
                            reuse: bool = False) -> tuple[torch.Tensor, Calibration | None, float]:
    """(windows, calibration, seconds): the first `n_windows` non-overlapping `seq_len`-token
    windows of data source `text` and, with a `calibration` source, a Calibration collected on
    `calibration_windows` seeded-random windows of it (documents shared with `text` are split
    between the two, never in both) in batches of `batch_size`, and the seconds that took
    (None and 0.0 without one). `reuse`: keep the calibration in $PPCOMPILE_CACHE/calibration,
    keyed by everything it depends on (weights, texts, windows, seed, ppcompile's source), and
    load it from there the next time instead of collecting it again."""
    eval_docs, cal, seconds = data.load_documents(text), None, 0.0
    if calibration:
        eval_docs, cal_docs = data.split_disjoint(eval_docs, data.load_documents(calibration))
        meta = {"text": calibration, "windows": calibration_windows, "seq_len": seq_len, "seed": seed}
        saved = _saved_calibration(model, text, meta) if reuse else None
        start = time.perf_counter()
        if saved is not None and saved.exists():
            cal = Calibration.load(saved)
        else:
            cal_windows = data.token_windows(cal_docs, tokenizer, seq_len, n_windows=calibration_windows,
                                             mode="random", seed=seed)
            cal = collect(model, data.iter_batches(cal_windows, batch_size), progress=progress, meta=meta)
            if saved is not None:
                saved.parent.mkdir(parents=True, exist_ok=True)
                cal.save(saved)
        seconds = time.perf_counter() - start
    return data.token_windows(eval_docs, tokenizer, seq_len, n_windows=n_windows), cal, seconds


def _saved_calibration(model, text: str, meta: dict) -> Path:
    """Where `windows_and_calibration(reuse=True)` keeps a calibration: named by a hash of what it
    depends on (the evaluation text too: it decides which documents calibration may use)."""
    key = json.dumps([fingerprint(model), cache.source_tag(), text, meta], sort_keys=True)
    return data.cache_dir() / "calibration" / f"{hashlib.sha256(key.encode()).hexdigest()[:24]}.pt"


def device_name(device: str | torch.device = "cpu") -> str:
    """How a row names the machine it ran on: the GPU's name for a CUDA device, else the CPU's
    ("cpu (x86_64, 8 threads)")."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def run_eval(model_name: str, text: str, seq_len: int, batch_size: int, n_batches: int,
             method_names: list[str], ratios: list[float], progress: bool, *,
             calibration: str | None = None, calibration_windows: int = 64, seed: int = 0,
             backend: str = "inductor", dtype: torch.dtype = torch.float32,
             options: dict | None = None) -> list[dict]:
    """`ppcompile eval`: every method (methods.METHODS) at every ratio (a ratio-free one once) on
    the first `batch_size * n_batches` windows of `text`, interleaved batch by batch, against dense
    where it is among them; one row per method and ratio: the figures (evaluate.MethodResult), its
    `method` and `ratio`, and what it ran with (model, text, calibration, backend, dtype, the
    PPConfig `options` of the pruned methods, torch, device). Each method is made by
    `build_method` under `label(name, ratio)` (bench/protocol.Methods.recording keeps their
    sessions)."""
    static = [m for m in method_names if m in POLICIES and POLICIES[m].needs_calibration]
    if static and not calibration:
        raise ValueError(f"method(s) {', '.join(static)} need calibration text: add --calibration SOURCE "
                         "(e.g. --calibration brown:fgh)")
    # a fresh model: drop what earlier runs in this process compiled, or their entries would count
    # against Dynamo's recompile_limit for the same forward and this run would fall back to eager
    torch._dynamo.reset()
    model, tokenizer = load(model_name, seq_len, dtype)
    windows, cal, cal_seconds = windows_and_calibration(model, tokenizer, text, seq_len, batch_size * n_batches,
                                                        batch_size, calibration, calibration_windows, seed, progress)
    # one compiled model per method and ratio, all of the same forward: let Dynamo keep them all
    n_compiled = len(method_names) * len(ratios) + 2
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, n_compiled)
    methods = {}
    for name in method_names:
        for ratio in ([0.0] if name in RATIO_FREE else ratios):
            opts = {} if name in RATIO_FREE else dict(options or {})
            methods[label(name, ratio)] = (name, ratio, build_method(name, model, ratio, cal, backend, **opts))
    reference = "dense" if "dense" in methods else None
    results = evaluate({key: fn for key, (_, _, fn) in methods.items()},
                       data.iter_batches(windows, batch_size), reference=reference, progress=progress)
    context = {"model": model_name, "text": text, "seq_len": seq_len, "batch_size": batch_size,
               "calibration": cal.meta if cal else None, "calibration_seconds": round(cal_seconds, 2),
               "backend": backend, "dtype": models.dtype_name(dtype), "options": dict(options or {}),
               "torch": torch.__version__,
               "device": device_name()}
    return [_row(r, *methods[r.method][:2], context) for r in results]


def _row(result: MethodResult, method: str, ratio: float, context: dict) -> dict:
    row = result.as_dict()
    row.update(method=method, ratio=ratio, **context)
    return row
