"""Command line: `ppcompile demo | eval | generate | inspect | fetch`."""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch
from tabulate import tabulate

from . import data, methods, models
from .calibration import collect
from .methods import METHODS, parse_methods
from .workloads import load, run_eval, windows_and_calibration


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
                        help=f"the model's dtype: {', '.join(models.DTYPES)}, or auto (bfloat16 on CUDA and where the CPU has "
                             f"bf16 dot products, AVX-512 BF16 or AMX, else float32); default {default}")


def parse_option(s: str) -> tuple[str, object]:
    """An argparse type for `--pp FIELD=VALUE`: 'probe_budget=0.015' -> ('probe_budget', 0.015), a
    PPConfig field and its value, as JSON when it parses, else a string ('probe=every'); the field
    itself is checked by PPConfig. The syntax of the options in a method's label (methods.label)."""
    try:
        return methods.parse_option(s)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _eval_args(sub) -> None:
    ev = sub.add_parser("eval", help="perplexity, KL and top-1 agreement to dense, and speed")
    ev.add_argument("--model", default="smollm2-135m", help="a known name or a local checkpoint folder")
    ev.add_argument("--data", default="brown:a", help="brown[:genres] | pydoc | file:PATH | wikitext2 | c4")
    ev.add_argument("--seq-len", type=_count(1), default=512)
    ev.add_argument("--batch-size", type=_count(1), default=8)
    ev.add_argument("--batches", type=_count(1), default=4)
    ev.add_argument("--methods", default="dense", help=f"comma-separated method names: {', '.join(METHODS)}")
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


def _demo_args(sub) -> None:
    demo = sub.add_parser("demo", help="dense vs Probe Pruning (and flap) at 0.4 on the packaged model: quality, "
                                       "and generation speed compiled with Inductor")
    demo.add_argument("--batches", type=_count(1), default=2, help="batches of 8 x 256 tokens scored for quality")
    _add_dtype(demo, "auto")


def _inspect_args(sub) -> None:
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


def _generate_args(sub) -> None:
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


def _fetch_args(sub) -> None:
    fetch = sub.add_parser("fetch", help="download a corpus into the cache")
    fetch.add_argument("corpus", choices=["brown"])


def parser() -> argparse.ArgumentParser:
    """The parser of ppcompile's command line (what `main` parses): one subcommand per
    _<command>_args, in the order `ppcompile --help` lists them."""
    p = argparse.ArgumentParser(prog="ppcompile", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    for add in (_eval_args, _demo_args, _inspect_args, _generate_args, _fetch_args):
        add(sub)
    return p


def _run_inspect(args) -> None:
    from .api import compile as pp_compile
    from .explain import explain
    model, tokenizer = load(args.model, args.seq_len, args.dtype)
    windows, cal, _ = windows_and_calibration(model, tokenizer, args.data, args.seq_len,
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
    model, tokenizer = load(args.model, 1, args.dtype)
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
            timed_generate(compiled, ids, new=new, pad_token_id=tokenizer.pad_token_id)  # compiles every graph
            first = time.perf_counter() - start
            out, prefill, step = timed_generate(compiled, ids, new=new, warm=True, pad_token_id=tokenizer.pad_token_id)
        text = tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
        label = "dense" if policy == "dense" else f"{policy} at ratio {ratio}"
        dtype = models.dtype_name(next(model.parameters()).dtype)
        print(f"--- {label} ({backend}, {dtype}): prefill {prefill * 1e3:.0f} ms, decode {1 / step:.1f} tokens/s "
              f"(first call, compiling: {first:.0f} s)\n{prompt}[{text}]\n", flush=True)


def _run_demo(args) -> None:
    from .demo import run
    run(args.dtype, batches=args.batches)


def _print_table(rows: list[dict]) -> None:
    cols = ["method", "ratio", "ppl", "kl", "top1", "seconds_per_batch", "tokens_per_second"]
    print(tabulate([[r[c] for c in cols] for r in rows], headers=cols, floatfmt=".4g"))
    r = rows[0]
    cal = r["calibration"]
    cal_line = f", calibration {cal['windows']} windows of {cal['text']} ({r['calibration_seconds']:.0f} s)" if cal else ""
    print(f"model {r['model']} ({r['dtype']}), text {r['text']}, seq {r['seq_len']}, batch {r['batch_size']}, "
          f"{r['batches']} batches{cal_line}, torch {r['torch']}, {r['device']}")


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    # Inductor's caches beside the model's, so that a second run of a command loads what the first
    # compiled (torch's default, /tmp/torchinductor_<user>, may not outlive a reboot)
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(data.cache_dir() / "inductor"))
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
            rows = run_eval(args.model, args.data, args.seq_len, args.batch_size, args.batches,
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
