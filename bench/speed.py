"""Speed benchmark: dense (Inductor) vs pp (Inductor) vs static flap (pre-sliced weights) vs pp
run eagerly, all in one process and interleaved, so that the ratios are honest on a noisy machine.

    python bench/speed.py                                   # the target: LLaMA-2B-shaped, batch 8, seq 512, r 0.4
    python bench/speed.py --model smollm2-135m --shapes 1x128,8x512 --ratio 0.2,0.4,0.6
    python bench/speed.py --dtype float32 --busy            # fp32; and again beside a CPU-bound process

--pp FIELD=VALUE: a PPConfig field for the pp methods (e.g. --pp probe_budget=0.015); the rows
record them.
--logits last: time the forward as generate()'s prefill runs it, the last position's logits only
(logits_to_keep=1), instead of every position's (a perplexity's; the default). At 8 x 512 with
SmolLM2's 49152-token vocabulary, every position's logits are a 400 MB output whose product and
first touch both methods pay alike.
--dtype: the model's dtype; by default the one a user who wants speed runs (`auto`: bfloat16 on
CUDA and on a CPU with a bf16 matrix unit, else float32), so that pp is measured against the
fastest dense. --busy: time every method a second time while another CPU-bound process runs
(the bench starts it), so that what a busy machine does to each method is a figure.

Per shape, every method at every ratio is timed against one dense baseline. Per configuration:
median seconds per batch over --reps timed rounds (after a compile/warm-up call), tokens/s, time
relative to dense, the FLOPs ratio (pruned/dense, torch's FlopCounterMode; the probe also apart),
`dense time x FLOPs ratio` (the FLOPs limit), the compile time of the first call, cold (in an empty
Inductor cache folder of the method's own, unless --caches) and warm (built again once the process
forgot it, from that folder), each by phase from Dynamo's and Inductor's own timers (compile_time.py;
`dense dynamic=true` and `pp dynamic=true` are compiled for any shape from the first call), and the peak memory a
steady call adds (CUDA: max allocated; CPU: the process's peak RSS above its level before the
call, Linux only); and the memory a method holds besides the model's weights (`added_mib`: the
tensors its passes made, such as flap's sliced weights and pp's transposed copies, and its
runtime's history tables), next to the weights' own (`weights_mib`).
Token ids are random: speed does not depend on them, and flap is calibrated on two random
batches for the same reason. Every method runs one shape: `pp` and `dense` compile it static, as
torch.compile and pp.compile do by default for a first shape; `pp dynamic=true` is the graph that
serves every shape (what pp.compile compiles on a second shape, or at once with dynamic=True).

--methods: method labels (protocol.label), POLICY[ FIELD=VALUE ...] with pp.compile options:
`pp backend=eager` runs the rewritten graph eagerly. Earlier runs' spellings `pp-eager` and
`pp-static` (pp dynamic=false) are read too; rows are written with the labels.

    python bench/speed.py --model smollm2-135m --stream 50 --max-batch 16 --max-len 1024

--stream N: N batches of random shapes (batch in 1..--max-batch, sequence in 8..--max-len, one
seeded list), served one after another by dense and by pp, each compiled once, interleaved per
batch: seconds per token over the stream with compile time included and apart, graphs compiled.
"""
from __future__ import annotations

import argparse
import contextlib
import inspect
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from tabulate import tabulate

import ppcompile as pp
from ppcompile.calibration import collect
from ppcompile.config import PPConfig
from ppcompile.cli import parse_option
from ppcompile.guard import assert_pruned
from ppcompile.models import (KNOWN_MODELS, RANDOM_ARCHS, dtype_name, dtype_suffix, load_model, parse_dtype,
                              random_model)
from ppcompile.policies import get_policy
from ppcompile.workloads import device_name
import compile_time  # noqa: E402 (bench/ is on sys.path)
from protocol import canonical, label, parse_label, provenance  # bench/ is the script's folder: on sys.path

ROOT = Path(__file__).resolve().parent.parent
EAGER = label("pp", backend="eager")  # pp, the rewritten graph run eagerly (earlier runs' JSON: pp-eager)
DENSE_DYNAMIC = label("dense", dynamic=True)  # dense compiled for any shape, as `pp dynamic=true` is
PP_DYNAMIC = label("pp", dynamic=True)
METHODS = [label("dense"), label("pp"), label("flap"), EAGER]  # also: label("pp", dynamic=True), DENSE_DYNAMIC
# the methods matrix() gives a column, and the column's caption (as the published tables have it)
MATRIX = {label("pp"): "pp", label("flap"): "flap", EAGER: "pp-eager"}


def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise OSError(f"{field} not in /proc/self/status")


class PeakMemory:
    """Peak memory a block adds (MiB): CUDA max allocated, or on Linux CPU the peak RSS above the
    level before the block (the kernel's high-water mark, reset through /proc/self/clear_refs)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.mib = float("nan")

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        else:
            try:
                Path("/proc/self/clear_refs").write_text("5")
                self.base = _rss_kib("VmRSS") * 1024
            except OSError:
                self.base = None
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.mib = (torch.cuda.max_memory_allocated() - self.base) / 2**20
        elif self.base is not None:
            self.mib = (_rss_kib("VmHWM") * 1024 - self.base) / 2**20


def _model(name: str, device: torch.device, dtype: torch.dtype, **overrides):
    """(model, vocabulary size): a random arch (with config `overrides`) or a known/local model."""
    if name in RANDOM_ARCHS:
        return random_model(name, dtype=dtype, **overrides).to(device), 32000 if "2b" in name else 128
    model, tokenizer = load_model(name, dtype=dtype, device=device)
    return model, len(tokenizer)


@contextlib.contextmanager
def busy_machine():
    """While open: one other CPU-bound process, a Python loop that keeps one core busy."""
    proc = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.5)  # let it start spinning before anything is timed
        yield
    finally:
        proc.kill()
        proc.wait()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _warm_inductor(device: torch.device) -> None:
    """Pay the process's one-time compile costs (Inductor's imports, its compile workers, the
    precompiled C++ header) on a tiny function, so that no measured compile carries them."""
    torch.compile(lambda x: (x * 2).sum(), dynamic=False)(torch.ones(8, device=device))
    torch._dynamo.reset()


def _compile_seconds() -> float:
    """Seconds Dynamo has spent compiling in this process, backend included (its own timer)."""
    return sum(torch._dynamo.utils.compilation_time_metrics.get("_compile.compile_inner", []))


def run_shape(model, vocab: int, batch: int, seq: int, ratios: list[float], methods: list[str], reps: int,
              device: torch.device, profile: bool = False, busy: bool = False,
              pp_options: dict | None = None, caches: bool = False, logits: str = "all") -> list[dict]:
    """Every method (a label: protocol.label) at every ratio on one (batch, seq), against one dense
    baseline, interleaved; with `busy`, the rounds again beside another CPU-bound process.
    `pp_options`: PPConfig fields for the pp methods (pp, pp backend=eager, pp dynamic=true).
    `logits`: "all" (every position's, as a perplexity needs) or "last" (the last position's, as
    generate()'s prefill asks for: logits_to_keep=1)."""
    pp_options = pp_options or {}
    call = {"use_cache": False, **({"logits_to_keep": 1} if logits == "last" else {})}
    methods = [canonical(m) for m in methods]
    policy_of = {m: parse_label(m)[0] for m in methods}
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (batch, seq), generator=gen).to(device)
    # a static policy's calibration (random batches: speed does not depend on them), shared by the
    # timed model and its FLOPs count so that both prune the same heads and channels
    cal = collect(model, [torch.randint(0, vocab, (2, seq), generator=gen).to(device) for _ in range(2)]) \
        if any(get_policy(p).needs_calibration for p in policy_of.values()) else None
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    dense_methods = [m for m in methods if policy_of[m] == "dense"]  # "dense", "dense dynamic=true"
    runs = [(m, 0.0) for m in dense_methods] + [(m, r) for r in ratios for m in methods if m not in dense_methods]
    flops = {}  # per method and ratio: a label's own options (probe_budget=, blocks=) change them
    for m, r in runs:
        policy = policy_of[m]
        if m not in dense_methods and (m, r) not in flops:
            own = {k: v for k, v in parse_label(m)[2].items() if k in PPConfig.__dataclass_fields__}
            flops[m, r] = pp.explain(model, {"input_ids": ids, **call}, r, policy=policy,
                                     calibration=cal if get_policy(policy).needs_calibration else None,
                                     **{**(pp_options if policy == "pp" else {}), **own}).flops
    torch._dynamo.reset()  # the captures above are not among the measured models

    def build(m: str, r: float):
        policy, _, options = parse_label(m)
        if policy == "dense":
            return torch.compile(model, dynamic=options.get("dynamic", False))
        return pp.compile(model, r, policy=policy, calibration=cal if get_policy(policy).needs_calibration else None,
                          quiet=True, **{**(pp_options if policy == "pp" else {}), **options})

    rows = {key: {"times": []} for key in runs}
    with torch.no_grad(), compile_time.OwnCaches() as own:
        # cold: every method compiles into an empty cache folder of its own; warm: the same models
        # built again once this process forgot them, found in that folder (--caches: Inductor's
        # usual folder for all, so that neither is a cold compile)
        for phase, prefix in (("cold", ""), ("warm", "warm_")):
            if phase == "warm":
                compile_time.forget_in_memory()
            fns = {key: build(*key) for key in runs}
            for key, fn in fns.items():  # compile + the first call
                start, before = time.perf_counter(), compile_time.snapshot()
                with contextlib.nullcontext() if caches else own.use(key):
                    fn(input_ids=ids, **call)
                _sync(device)
                rows[key][prefix + "first_call_s"] = time.perf_counter() - start
                rows[key][prefix + "compile_phases"] = compile_time.phases_since(before)
                rows[key][prefix + "compile_s"] = rows[key][prefix + "compile_phases"]["total"]
        if profile:  # where each method's time goes: torch's profiler, one steady call
            for (m, r), fn in fns.items():
                with torch.profiler.profile() as prof:
                    fn(input_ids=ids, **call)
                    _sync(device)
                print(f"\n# profile: {m}, batch {batch}, seq {seq}, ratio {r}: {_profile_totals(prof)}\n"
                      + prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25, max_name_column_width=90),
                      flush=True)
        for rep in range(reps):
            for key, fn in fns.items():
                with PeakMemory(device) as mem:  # the peak of a steady call: the first round's
                    rows[key]["times"].append(_timed(fn, ids, device, call))
                if rep == 0:
                    rows[key]["peak_mib"] = mem.mib
        if busy:
            with busy_machine():
                for rep in range(reps):
                    for key, fn in fns.items():
                        rows[key].setdefault("busy_times", []).append(_timed(fn, ids, device, call))
    for (m, r), fn in fns.items():  # every timed call of a pruned method ran pruned, or nothing is reported
        if m not in dense_methods:
            policy, _, options = parse_label(m)
            assert_pruned(fn, method=f"{label(policy, r, **options)}, batch {batch} x {seq}")
    added = {key: _added_mib(fn) for key, fn in fns.items()}
    blocks = {key: _pruned_blocks(fn) for key, fn in fns.items() if key[0] not in dense_methods}
    weights = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
    dense = rows.get(("dense", 0.0))
    dense_s = statistics.median(dense["times"]) if dense else None
    dense_busy = statistics.median(dense["busy_times"]) if dense and busy else None
    out = []
    for (m, r), row in rows.items():
        median = statistics.median(row["times"])
        busy_s = statistics.median(row["busy_times"]) if busy else None
        f = flops.get((m, r))
        ratio_flops = f["pruned"] / f["dense"] if f else 1.0
        out.append({"method": m, "batch": batch, "seq_len": seq, "ratio": r, "logits": logits,
                    "seconds": median, "spread": [min(row["times"]), max(row["times"])],
                    "tokens_per_second": batch * seq / median,
                    "vs_dense": median / dense_s if dense_s else None,
                    "flops_ratio": ratio_flops,
                    "probe_flops": f["probe"] / f["dense"] if f else 0.0,
                    "vs_flops_limit": median / (dense_s * ratio_flops) if dense_s else None,
                    **{k: row[k] for k in ("first_call_s", "compile_s", "compile_phases", "warm_first_call_s",
                                           "warm_compile_s", "warm_compile_phases")},
                    "peak_mib": row["peak_mib"],
                    "peak_vs_dense": row["peak_mib"] / dense["peak_mib"] if dense and dense["peak_mib"] else None,
                    "weights_mib": weights, "added_mib": added[m, r],
                    **({"pruned_blocks": blocks[m, r]} if (m, r) in blocks else {}),
                    "busy_seconds": busy_s, "busy_vs_dense": busy_s / dense_busy if dense_busy else None,
                    "provenance": provenance(None if m in dense_methods else fns[m, r], dtype=model.dtype)})
    return out


def _pruned_blocks(fn) -> str:
    """"pruned/blocks" of the graph the timed calls ran (the last compiled), and how many of the
    rest the cost rule left dense (passes/cost.py): "0/60 (54 cannot pay)"."""
    result = fn.pp.passes[-1]
    by_cost = len(result.dense_by_cost)
    return f"{len(result.active_sites)}/{len(result.sites)}" + (f" ({by_cost} cannot pay)" if by_cost else "")


def _profile_totals(prof) -> str:
    """One call's self CPU time by kind: matmuls, attention, Inductor's C++ kernels (named with
    --profile), the rest."""
    kinds = {"matmul": 0.0, "attention": 0.0, "Inductor kernels": 0.0, "other": 0.0}
    for e in prof.key_averages():
        name = e.key
        kind = ("matmul" if name in ("aten::mm", "aten::addmm", "aten::bmm") else
                "attention" if name.startswith("aten::") and "scaled_dot_product" in name else
                "Inductor kernels" if "cpp_fused" in name or name.startswith("triton_") else "other")
        kinds[kind] += e.self_cpu_time_total / 1e3
    return ", ".join(f"{k} {v:.1f} ms" for k, v in kinds.items())


def _added_mib(fn) -> float:
    """MiB a compiled method holds besides the model's weights: the tensors its passes made
    (static policies' sliced weights, pp's transposed copies and score terms) and its runtime's
    state (history tables, slots)."""
    session = fn.__dict__.get("pp")  # this compiled object's own (getattr would reach the model's)
    if session is None:
        return 0.0
    tensors = [b for r in session.passes for b in r.gm.buffers()] + list(session.runtime.slots.values())
    return sum(t.numel() * t.element_size() for t in tensors) / 2**20


def _timed(fn, ids: torch.Tensor, device: torch.device, call: dict) -> float:
    _sync(device)
    start = time.perf_counter()
    fn(input_ids=ids, **call)
    _sync(device)
    return time.perf_counter() - start


def run_stream(model, vocab: int, n: int, max_batch: int, max_len: int, ratio: float,
               device: torch.device) -> list[dict]:
    """dense and pp, each compiled once (dense: batch and sequence marked dynamic, as pp does),
    over the same stream of `n` random shapes, interleaved per batch."""
    gen = torch.Generator().manual_seed(0)
    shapes = [(int(torch.randint(1, max_batch + 1, (), generator=gen)),
               int(torch.randint(8, max_len + 1, (), generator=gen))) for _ in range(n)]
    torch._dynamo.reset()
    dense_compiled = torch.compile(model, dynamic=False)

    def dense(ids):
        ids = ids.detach()
        torch._dynamo.maybe_mark_dynamic(ids, 0)
        torch._dynamo.maybe_mark_dynamic(ids, 1)
        return dense_compiled(input_ids=ids, use_cache=False)

    pruned = pp.compile(model, ratio, dynamic=True)  # a server of mixed shapes: dynamic from the first batch
    fns = {"dense": dense, "pp": lambda ids: pruned(input_ids=ids, use_cache=False)}
    stats = {m: {"seconds": 0.0, "compile_s": 0.0, "graphs": 0} for m in fns}
    tokens = 0
    with torch.no_grad():
        for b, L in shapes:
            ids = torch.randint(0, vocab, (b, L), generator=gen).to(device)
            tokens += b * L
            for m, fn in fns.items():
                compiling, graphs = _compile_seconds(), _graphs()
                _sync(device)
                start = time.perf_counter()
                fn(ids)
                _sync(device)
                stats[m]["seconds"] += time.perf_counter() - start
                stats[m]["compile_s"] += _compile_seconds() - compiling
                stats[m]["graphs"] += _graphs() - graphs
    assert_pruned(pruned, method=f"pp at ratio {ratio} (stream of {n} shapes)")
    rows = []
    for m, st in stats.items():
        steady = st["seconds"] - st["compile_s"]
        rows.append({"method": m, "stream": n, "max_batch": max_batch, "max_len": max_len, "ratio": ratio,
                     "tokens": tokens, "graphs": st["graphs"], "seconds": st["seconds"], "compile_s": st["compile_s"],
                     "us_per_token": 1e6 * st["seconds"] / tokens, "us_per_token_steady": 1e6 * steady / tokens,
                     "provenance": provenance(pruned if m == "pp" else None, dtype=model.dtype)})
    for r in rows:
        r["vs_dense"] = r["seconds"] / rows[0]["seconds"]
        r["vs_dense_steady"] = (r["seconds"] - r["compile_s"]) / (rows[0]["seconds"] - rows[0]["compile_s"])
    return rows


def _graphs() -> int:
    return int(torch._dynamo.utils.counters["stats"]["unique_graphs"])


def table(rows: list[dict]) -> str:
    cols = ["model", "dtype", "batch", "seq_len", "ratio", "method", "seconds", "tokens_per_second", "vs_dense",
            "flops_ratio", "vs_flops_limit", "probe_flops", "compile_s", "peak_mib", "peak_vs_dense", "added_mib"]
    if any("warm_compile_s" in r for r in rows):  # runs that measured a warm compile
        cols.insert(cols.index("compile_s") + 1, "warm_compile_s")
    if any(r.get("busy_vs_dense") for r in rows):
        cols.append("busy_vs_dense")
    if any("pruned_blocks" in r for r in rows):  # runs since the cost rule: what the timed graph pruned
        cols.insert(cols.index("method") + 1, "pruned_blocks")
    if any("run" in r for r in rows):  # a shape run more than once (_numbered_runs)
        cols.insert(cols.index("ratio"), "run")
    if any(r.get("logits", "all") != "all" for r in rows):  # runs since --logits, one of them "last"
        cols.insert(cols.index("ratio"), "logits")
    return tabulate([[r.get(c) for c in cols] for r in rows], headers=cols, floatfmt=".3g", tablefmt="github")


def compile_table(rows: list[dict]) -> str:
    """Each row's cold and warm compile by phase (bench/compile_time.py), seconds; rows of runs
    that predate the breakdown are left out."""
    names = [name for name, _, _ in compile_time.PHASES] + ["total"]
    runs = any("run" in r for r in rows)
    body = [[r["model"], r["batch"], r["seq_len"], *([r.get("run")] if runs else []), r["ratio"], r["method"], when,
             *(_seconds(r[key].get(n)) for n in names)]
            for r in rows for when, key in (("cold", "compile_phases"), ("warm", "warm_compile_phases")) if key in r]
    if not body:
        return ""
    return tabulate(body, headers=["model", "batch", "seq_len", *(["run"] if runs else []), "ratio", "method", "compile",
                                   *names], floatfmt=".1f", tablefmt="github")


def _seconds(x):
    """A phase's seconds as a table shows them: what the difference of two timer readings leaves
    of a phase that did not run (-0.0001) is 0."""
    return 0.0 if x is not None and abs(x) < 0.05 else x


def matrix(rows: list[dict]) -> str:
    """One line per (model, dtype, shape, run, ratio): each method's time relative to that shape's
    dense of the same run, the FLOPs ratios, and pp's compile time relative to dense's."""
    runs = any("run" in r for r in rows)

    def shape(r):
        return (r["model"], r.get("dtype", "float32"), r["batch"], r["seq_len"], *((r.get("run"),) if runs else ()))

    dense_compile = {shape(r): r["compile_s"] for r in rows if r["method"] == "dense"}
    dense_dynamic_compile = {shape(r): r["compile_s"] for r in rows if r["method"] == DENSE_DYNAMIC}
    pp_dynamic = {shape(r) for r in rows if r["method"] == PP_DYNAMIC}
    cells: dict[tuple, dict] = {}
    for r in rows:
        method = canonical(r["method"])  # earlier runs' spellings too (pp-eager)
        if parse_label(method)[0] == "dense":  # the baselines: every column is relative to them
            continue
        key = (*shape(r), r["ratio"])
        cell = cells.setdefault(key, {})
        if method in MATRIX:
            cell[MATRIX[method]] = r["vs_dense"]
        if method == "pp":
            cell["pp FLOPs"], cell["probe FLOPs"] = r["flops_ratio"], r["probe_flops"]
            base = dense_compile.get(key[:-1])
            cell["pp compile"] = r["compile_s"] / base if base else None
            cell["pp busy"] = r.get("busy_vs_dense")
        # the graph for every shape, against dense's; a row that does not say its graph ran before
        # dynamic=None, when `pp` compiled dynamic
        if method == PP_DYNAMIC or (method == "pp" and "graph" not in r.get("provenance", {}) and
                                    key[:-1] not in pp_dynamic):
            dynamic = dense_dynamic_compile.get(key[:-1])
            cell["pp compile vs dynamic"] = r["compile_s"] / dynamic if dynamic else None
    cols = [*MATRIX.values(), "pp FLOPs", "probe FLOPs", "pp compile", "pp busy"]
    if dense_dynamic_compile:  # runs that compiled dense for any shape too
        cols.insert(cols.index("pp compile") + 1, "pp compile vs dynamic")
    headers = [c if "FLOPs" in c else "pp dynamic compile / dense dynamic" if c == "pp compile vs dynamic" else f"{c} / dense"
               for c in cols]
    body = [[*key, *(cell.get(c) for c in cols)] for key, cell in cells.items() if cell]  # a shape of no matrix method: none
    if not body:
        return ""
    return tabulate(body, headers=["model", "dtype", "batch", "seq_len", *(["run"] if runs else []), "ratio", *headers],
                    floatfmt=".3g", tablefmt="github")


def _numbered_runs(files: list[list[dict]]) -> list[dict]:
    """The rows of several runs' files; where a shape was run in more than one, each row gets its
    file's number (`run`), so that its ratios are to the dense of its own run."""
    def shape(r):
        return r["model"], r.get("dtype"), r["batch"], r["seq_len"]

    files_of: dict[tuple, set[int]] = {}
    for i, rows in enumerate(files):
        for r in rows:
            files_of.setdefault(shape(r), set()).add(i)
    return [{**r, "run": i + 1} if len(files_of[shape(r)]) > 1 else r for i, rows in enumerate(files) for r in rows]


def _shapes(s: str) -> list[tuple[int, int]]:
    try:
        return [(int(b), int(l)) for b, l in (x.lower().split("x") for x in s.split(","))]
    except ValueError:
        raise argparse.ArgumentTypeError(f"shapes {s!r}: expected BATCHxSEQ,..., e.g. 1x128,8x512") from None


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="llama-2b-shaped",
                   help=f"a known model ({', '.join(KNOWN_MODELS)}) or a random arch ({', '.join(RANDOM_ARCHS)})")
    p.add_argument("--shapes", type=_shapes, default=[(8, 512)],
                   help="BATCHxSEQ,... e.g. 1x512,8x512,16x512 (default 8x512)")
    p.add_argument("--ratio", type=lambda s: [float(x) for x in s.split(",")], default=[0.4])
    p.add_argument("--methods", default=",".join(METHODS),
                   help="comma-separated method labels, POLICY[ FIELD=VALUE ...] (see above)")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="auto", help="float32, bfloat16, float16 or auto (see above)")
    p.add_argument("--busy", action="store_true", help="also time every method beside a CPU-bound process")
    p.add_argument("--pp", type=parse_option, action="append", default=[], metavar="FIELD=VALUE",
                   help="a PPConfig field for the pp methods, e.g. --pp probe_budget=0.015 (repeatable)")
    p.add_argument("--profile", action="store_true",
                   help="also print a profile of one call per method (Inductor's C++ kernels by name)")
    p.add_argument("--out", type=Path, help="JSON output (default bench/results/speed_<model>_<device>[_<dtype>].json, "
                                            "no dtype in the name for float32)")
    p.add_argument("--from-json", type=Path, nargs="+", help="print the tables of earlier runs and exit")
    p.add_argument("--stream", type=int, default=0, help="serve N batches of random shapes instead (see above)")
    p.add_argument("--max-batch", type=int, default=16)
    p.add_argument("--max-len", type=int, default=1024)
    p.add_argument("--logits", choices=("all", "last"), default="all",
                   help="every position's logits (default, as a perplexity needs) or the last one's "
                        "(logits_to_keep=1, as generate()'s prefill asks for)")
    p.add_argument("--caches", action="store_true",
                   help="let Inductor reuse compiled graphs from its on-disk caches (then compile_s is not a compile time)")
    args = p.parse_args()
    if args.from_json:
        rows = _numbered_runs([json.loads(f.read_text()) for f in args.from_json])
        print("\n\n".join(t for t in (table(rows), matrix(rows), compile_table(rows)) if t))
        return
    device = torch.device(args.device)
    torch._inductor.config.cpp.enable_kernel_profile = args.profile  # C++ kernels by name in the profile
    _warm_inductor(device)
    dtype = parse_dtype(args.dtype, device)
    model, vocab = _model(args.model, device, dtype)
    tag = f"{args.model}_{device.type}{dtype_suffix(dtype)}" + ("_last-logits" if args.logits == "last" else "")
    if args.logits == "last" and "logits_to_keep" not in inspect.signature(model.forward).parameters:
        p.error(f"--logits last: {type(model).__name__}.forward takes no logits_to_keep; use --logits all")
    machine = device_name(device)
    if args.stream:
        # every graph of the stream compiles from scratch, so that compile_s measures compiling
        torch._inductor.config.force_disable_caches = not args.caches
        rows = [{"model": args.model, "dtype": dtype_name(dtype), **r, "machine": machine, "torch": torch.__version__}
                for r in run_stream(model, vocab, args.stream, args.max_batch, args.max_len, args.ratio[0], device)]
        out = args.out or ROOT / f"bench/results/stream_{tag}.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(rows, indent=2) + "\n")
        cols = ["model", "method", "stream", "max_batch", "max_len", "ratio", "tokens", "graphs", "seconds",
                "compile_s", "us_per_token", "us_per_token_steady", "vs_dense", "vs_dense_steady"]
        print(tabulate([[r[c] for c in cols] for r in rows], headers=cols, floatfmt=".3g", tablefmt="github"))
        print(f"\n{args.model} ({dtype_name(dtype)}), {machine}, torch {torch.__version__}; JSON: {out}")
        return
    rows = []
    for batch, seq in args.shapes:
        measured = run_shape(model, vocab, batch, seq, args.ratio, args.methods.split(","), args.reps, device,
                             args.profile, args.busy, dict(args.pp), args.caches, args.logits)
        for r in measured:
            rows.append({"model": args.model, "dtype": dtype_name(dtype), **r, "pp_options": dict(args.pp),
                         "machine": machine, "torch": torch.__version__})
            print(json.dumps(rows[-1]), flush=True)
    out = args.out or ROOT / f"bench/results/speed_{tag}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(rows, indent=2) + "\n")
    print("\n\n".join(t for t in (table(rows), matrix(rows), compile_table(rows)) if t))
    print(f"\n{args.model} ({dtype_name(dtype)}, {args.logits} logits), {machine}, torch {torch.__version__}, "
          f"median of {args.reps} rounds"
          f"{'; busy: beside one CPU-bound process' if args.busy else ''}; JSON: {out}")


if __name__ == "__main__":
    main()
