"""Command line: `ppcompile demo | eval | generate | inspect | fetch`."""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch
from tabulate import tabulate

from . import data, models
from .calibration import collect
from .policies import POLICIES
from .evaluate import MethodResult, evaluate
from .methods import RATIO_FREE, build_method, parse_methods


# argparse type functions: a bad number fails while parsing (exit 2, naming the option), before a
# model is loaded; argparse prefixes the message with "argument --ratio:"
def _ratio(spec: str) -> float:
    try:
        ratio = float(spec)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number in [0, 1) (the fraction pruned), got {spec!r}: "
                                         "e.g. --ratio 0.4") from None
    if not 0.0 <= ratio < 1.0:  # also nan
        raise argparse.ArgumentTypeError(f"must be in [0, 1) (the fraction pruned), got {spec!r}: "
                                         "e.g. --ratio 0.4")
    return ratio


def _ratios(spec: str) -> list[float]:
    ratios = [_ratio(r.strip()) for r in spec.split(",") if r.strip()]
    if not ratios:
        raise argparse.ArgumentTypeError(f"takes one or more numbers in [0, 1) separated by commas, got "
                                         f"{spec!r}: e.g. --ratio 0.2,0.4")
    return ratios


def _count(minimum: int):
    """An int option of at least `minimum`: --seq-len 0 or --batches -1 is refused while parsing."""
    def parse(spec: str) -> int:
        try:
            value = int(spec)
        except ValueError:
            value = None
        if value is None or value < minimum:
            raise argparse.ArgumentTypeError(f"must be an integer >= {minimum}, got {spec!r}")
        return value
    return parse


def _dtype(spec: str) -> torch.dtype:
    try:
        return models.parse_dtype(spec)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _add_dtype(parser, default: str) -> None:
    parser.add_argument("--dtype", type=_dtype, default=default,
                        help=f"the model's dtype: {', '.join(models.DTYPES)}, or auto (bfloat16 where the CPU has "
                             f"a bf16 matrix unit or on CUDA, else float32); default {default}")


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


def parse_option(s: str) -> tuple[str, object]:
    """'probe_budget=0.015' -> ('probe_budget', 0.015): a PPConfig field and its value, as JSON
    when it parses, else a string ('probe=every'). The field itself is checked by PPConfig."""
    field, sep, value = s.partition("=")
    if not sep or not field:
        raise argparse.ArgumentTypeError(f"expected FIELD=VALUE, e.g. probe_budget=0.015, got {s!r}")
    try:
        return field, json.loads(value)
    except json.JSONDecodeError:
        return field, value


def _loaded(model_name: str, seq_len: int, dtype: torch.dtype = torch.float32):
    """(model, tokenizer), refusing a --seq-len past the model's positions before any pass runs."""
    _check_seq_len_early(model_name, seq_len)
    model, tokenizer = models.load_model(model_name, dtype=dtype)
    _check_seq_len(seq_len, getattr(model.config, "max_position_embeddings", None))
    return model, tokenizer


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ppcompile", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    ev = sub.add_parser("eval", help="perplexity, KL and top-1 agreement to dense, and speed")
    ev.add_argument("--model", default="smollm2-135m", help="a known name or a local checkpoint folder")
    ev.add_argument("--data", default="brown:a", help="brown[:genres] | pydoc | file:PATH | wikitext2 | c4")
    ev.add_argument("--seq-len", type=_count(1), default=512)
    ev.add_argument("--batch-size", type=_count(1), default=8)
    ev.add_argument("--batches", type=_count(1), default=4)
    ev.add_argument("--methods", default="dense", help="comma-separated method names")
    ev.add_argument("--ratio", type=_ratios, default=[0.4], help="pruning ratio(s), comma-separated")
    ev.add_argument("--calibration", metavar="SOURCE",
                    help="calibration text (a data source, kept disjoint from --data): seeds pp's "
                         "history; wanda-sp and flap need it")
    ev.add_argument("--calibration-windows", type=_count(1), default=64,
                    help="seeded-random windows of --seq-len tokens drawn from the calibration text")
    ev.add_argument("--seed", type=int, default=0, help="seed of the calibration windows")
    ev.add_argument("--pp", type=parse_option, action="append", default=[], metavar="FIELD=VALUE",
                    help="a PPConfig field for the pruned methods, e.g. --pp probe=every --pp probe_budget=0.015")
    ev.add_argument("--backend", choices=["inductor", "eager"], default="inductor",
                    help="how the pruned methods run the rewritten graph")
    ev.add_argument("--json", type=Path, help="also write the figures as JSON to this file")
    ev.add_argument("--quiet", action="store_true", help="no progress on stderr")
    _add_dtype(ev, "float32")

    demo = sub.add_parser("demo", help="dense vs Probe Pruning at 0.4 on the packaged model")
    demo.add_argument("--batches", type=_count(1), default=2)
    _add_dtype(demo, "auto")

    ins = sub.add_parser("inspect", help="what the pass does: sites, kept counts, FLOPs; with --batches, "
                                         "per-layer telemetry of what each batch kept")
    ins.add_argument("--model", default="smollm2-135m")
    ins.add_argument("--ratio", type=_ratio, default=0.4)
    ins.add_argument("--policy", default="pp")
    ins.add_argument("--data", default="brown:a")
    ins.add_argument("--seq-len", type=_count(1), default=128)
    ins.add_argument("--batch-size", type=_count(1), default=8)
    ins.add_argument("--batches", type=_count(0), default=0, help="run this many batches and report telemetry")
    ins.add_argument("--calibration", metavar="SOURCE", help="calibration text (disjoint from --data)")
    ins.add_argument("--calibration-windows", type=_count(1), default=16)
    ins.add_argument("--backend", choices=["inductor", "eager"], default="inductor")
    ins.add_argument("--plot", type=Path, help="draw how often each head/channel was kept (PNG)")
    ins.add_argument("--dump-dir", type=Path, help="also dump the graphs, sites and Inductor code here")
    _add_dtype(ins, "float32")

    gen = sub.add_parser("generate", help="generate a continuation of --prompt through the pass; print it and "
                                          "the prefill time and decode tokens/s")
    gen.add_argument("--model", default="smollm2-135m")
    gen.add_argument("--prompt", default="The history of the city begins", help="the text to continue")
    gen.add_argument("--max-new-tokens", type=_count(2), default=64)
    gen.add_argument("--ratio", type=_ratio, default=0.4)
    gen.add_argument("--policy", default="pp")
    gen.add_argument("--calibration", metavar="SOURCE", help="calibration text: seeds pp's history; wanda-sp and "
                                                             "flap need it")
    gen.add_argument("--calibration-windows", type=_count(1), default=16)
    gen.add_argument("--backend", choices=["inductor", "eager"], default="inductor")
    gen.add_argument("--compare", action="store_true", help="also generate with dense, compiled the same way")
    _add_dtype(gen, "auto")

    fetch = sub.add_parser("fetch", help="download a corpus into the cache")
    fetch.add_argument("corpus", choices=["brown"])
    return p


def _run_eval(model_name: str, text: str, seq_len: int, batch_size: int, n_batches: int,
              method_names: list[str], ratios: list[float], progress: bool, *,
              calibration: str | None = None, calibration_windows: int = 64, seed: int = 0,
              backend: str = "inductor", dtype: torch.dtype = torch.float32,
              options: dict | None = None) -> list[dict]:
    static = [m for m in method_names if m in POLICIES and POLICIES[m].needs_calibration]
    if static and not calibration:
        raise ValueError(f"method(s) {', '.join(static)} need calibration text: add --calibration SOURCE "
                         "(e.g. --calibration brown:fgh)")
    # a fresh model: drop what earlier runs in this process compiled, or their entries would count
    # against Dynamo's recompile_limit for the same forward and this run would fall back to eager
    torch._dynamo.reset()
    model, tokenizer = _loaded(model_name, seq_len, dtype)
    windows, cal, cal_seconds = _windows_and_calibration(model, tokenizer, text, seq_len, batch_size * n_batches,
                                                         batch_size, calibration, calibration_windows, seed, progress)
    # one compiled model per method and ratio, all of the same forward: let Dynamo keep them all
    n_compiled = len(method_names) * len(ratios) + 2
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, n_compiled)
    methods = {}
    for name in method_names:
        for ratio in ([0.0] if name in RATIO_FREE else ratios):
            label = name if name in RATIO_FREE else f"{name}@{ratio:g}"
            opts = {} if name in RATIO_FREE else dict(options or {})
            methods[label] = (name, ratio, build_method(name, model, ratio, cal, backend, **opts))
    reference = "dense" if "dense" in methods else None
    results = evaluate({label: fn for label, (_, _, fn) in methods.items()},
                       data.iter_batches(windows, batch_size), reference=reference, progress=progress)
    context = {"model": model_name, "text": text, "seq_len": seq_len, "batch_size": batch_size,
               "calibration": cal.meta if cal else None, "calibration_seconds": round(cal_seconds, 2),
               "backend": backend, "dtype": models.dtype_name(dtype), "options": dict(options or {}),
               "torch": torch.__version__,
               "device": _device_name()}
    return [_row(r, *methods[r.method][:2], context) for r in results]


def _windows_and_calibration(model, tokenizer, text: str, seq_len: int, n_windows: int, batch_size: int,
                             calibration: str | None, calibration_windows: int, seed: int, progress: bool):
    """Evaluation windows of `text` and, with a calibration source, a Calibration from seeded-random
    windows of it (documents shared with `text` are split between the two, never in both) and the
    seconds the calibration passes took."""
    eval_docs, cal, seconds = data.load_documents(text), None, 0.0
    if calibration:
        eval_docs, cal_docs = data.split_disjoint(eval_docs, data.load_documents(calibration))
        cal_windows = data.token_windows(cal_docs, tokenizer, seq_len, n_windows=calibration_windows,
                                         mode="random", seed=seed)
        start = time.perf_counter()
        cal = collect(model, data.iter_batches(cal_windows, batch_size), progress=progress,
                      meta={"text": calibration, "windows": calibration_windows, "seq_len": seq_len, "seed": seed})
        seconds = time.perf_counter() - start
    return data.token_windows(eval_docs, tokenizer, seq_len, n_windows=n_windows), cal, seconds


def _run_inspect(args) -> None:
    from .api import compile as pp_compile
    from .explain import explain
    model, tokenizer = _loaded(args.model, args.seq_len, args.dtype)
    windows, cal, _ = _windows_and_calibration(model, tokenizer, args.data, args.seq_len,
                                            args.batch_size * max(args.batches, 1), args.batch_size,
                                            args.calibration, args.calibration_windows, 0, False)
    batches = list(data.iter_batches(windows, args.batch_size))
    print(explain(model, batches[0], args.ratio, policy=args.policy, calibration=cal))
    if args.batches <= 0:
        return
    torch._dynamo.reset()  # explain compiled the same forward once
    compiled = pp_compile(model, args.ratio, policy=args.policy, calibration=cal, backend=args.backend,
                          dump_dir=args.dump_dir, telemetry=True)
    with torch.no_grad():
        for batch in batches:
            compiled(batch)
    rows = model.pp.runtime.stats()
    print(f"\ntelemetry over {args.batches} batches of {args.batch_size} x {args.seq_len} tokens of {args.data} "
          "(the first is the warm-up; jaccard: overlap of consecutive batches' kept sets; "
          "probe share: the probe's part of the fused energy, the rest is history):")
    cols = ["layer", "kind", "kept", "total", "jaccard", "probe_share", "pruned_flops"]
    print(tabulate([[r[c] for c in cols] for r in rows], headers=cols, floatfmt=".3f"))
    if args.plot:
        from .plot import plot_kept
        title = f"{args.model}, {args.policy} at ratio {args.ratio}, {args.batches} batches of {args.data}"
        print(f"wrote {plot_kept(model.pp.runtime, args.plot, title)}")


def _run_generate(args) -> None:
    model, tokenizer = _loaded(args.model, 1, args.dtype)
    cal = None
    if args.calibration:
        windows = data.token_windows(data.load_documents(args.calibration), tokenizer, 256,
                                     n_windows=args.calibration_windows, mode="random", seed=0)
        cal = collect(model, data.iter_batches(windows, 8))
    runs = ([("dense", 0.0)] if args.compare else []) + [(args.policy, args.ratio)]
    _generate_and_print(model, tokenizer, tokenizer(args.prompt, return_tensors="pt").input_ids, runs,
                        args.max_new_tokens, cal, args.backend)


def _generate_and_print(model, tokenizer, ids: torch.Tensor, runs: list[tuple[str, float]], new: int,
                        cal=None, backend: str = "inductor") -> None:
    """Each (policy, ratio) compiled by pp.compile generates `new` greedy tokens after `ids` (1, L):
    print the continuation, prefill time and decode tokens/s (after a first, compiling call)."""
    from .api import compile as pp_compile
    from .generation import timed_generate
    prompt = tokenizer.decode(ids[0], skip_special_tokens=True)
    for policy, ratio in runs:
        compiled = pp_compile(model, ratio, policy=policy, calibration=cal, backend=backend)
        with torch.no_grad():
            start = time.perf_counter()
            timed_generate(compiled, ids, new=2, pad_token_id=tokenizer.pad_token_id)  # compiles both graphs
            first = time.perf_counter() - start
            out, prefill, step = timed_generate(compiled, ids, new=new, pad_token_id=tokenizer.pad_token_id)
        text = tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
        label = "dense" if policy == "dense" else f"{policy} at ratio {ratio}"
        dtype = models.dtype_name(next(model.parameters()).dtype)
        print(f"--- {label} ({backend}, {dtype}): prefill {prefill * 1e3:.0f} ms, decode {1 / step:.1f} tokens/s "
              f"(first call, compiling: {first:.0f} s)\n{prompt}[{text}]\n", flush=True)


def _run_demo(args) -> None:
    rows = _run_eval("smollm2-135m", "brown:a", 256, 4, args.batches, ["dense", "pp"], [0.4], True,
                     dtype=args.dtype)
    _print_table(rows)
    model, tokenizer = _loaded("smollm2-135m", 256, args.dtype)
    windows = data.token_windows(data.load_documents("brown:a"), tokenizer, 48, n_windows=1)
    print("\ngeneration: 32 greedy tokens after the first 48 tokens of brown:a, dense and pp both "
          "compiled the same way (pp.compile, Inductor, static KV cache):\n")
    _generate_and_print(model, tokenizer, windows[:1], [("dense", 0.0), ("pp", 0.4)], 32)


def _row(result: MethodResult, method: str, ratio: float, context: dict) -> dict:
    row = result.as_dict()
    row.update(method=method, ratio=ratio, **context)
    return row


def _device_name() -> str:
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def _print_table(rows: list[dict]) -> None:
    cols = ["method", "ratio", "ppl", "kl", "top1", "seconds_per_batch", "tokens_per_second"]
    print(tabulate([[r[c] for c in cols] for r in rows], headers=cols, floatfmt=".4g"))
    r = rows[0]
    cal = r["calibration"]
    cal_line = f", calibration {cal['windows']} windows of {cal['text']} ({r['calibration_seconds']:.0f} s)" if cal else ""
    print(f"model {r['model']} ({r['dtype']}), text {r['text']}, seq {r['seq_len']}, batch {r['batch_size']}, "
          f"{r['batches']} batches{cal_line}, torch {r['torch']}, {r['device']}")


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "fetch":
            print(data.fetch_brown())
            return 0
        if args.command == "inspect":
            _run_inspect(args)
            return 0
        if args.command == "generate":
            _run_generate(args)
            return 0
        if args.command == "demo":
            _run_demo(args)
            return 0
        else:
            rows = _run_eval(args.model, args.data, args.seq_len, args.batch_size, args.batches,
                             parse_methods(args.methods), args.ratio, not args.quiet,
                             calibration=args.calibration, calibration_windows=args.calibration_windows,
                             seed=args.seed, backend=args.backend, dtype=args.dtype, options=dict(args.pp))
            if args.json:
                args.json.parent.mkdir(parents=True, exist_ok=True)
                args.json.write_text(json.dumps(rows, indent=2) + "\n")
        _print_table(rows)
        return 0
    except (ValueError, TypeError, FileNotFoundError) as e:  # a bad option value: its message, no traceback
        print(f"ppcompile: error: {e}", file=sys.stderr)
        return 2
