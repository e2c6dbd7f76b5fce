"""Every causal-LM model type transformers registers, built from a tiny random config, through the
pass: per model type, how many sites end pruned and how many dense (with the reason), and whether
anything crashed. The pass must never crash, whatever the model.

    python bench/archs.py                       # every type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    python bench/archs.py --types gpt2,phi3     # some
    python bench/archs.py --json out.json
    python bench/archs.py --json bench/results/archs_tiny_configs.json --readme   # README summary, docs/archs.md

Each model type runs in its own process (memory limit --memory-gib, time limit --seconds).
Per type: a tiny config (3 layers, hidden 64, 4 heads of 16, vocab 256; each field set only where
the config has it; special token ids moved into the tiny vocabulary), the model in eval mode with sdpa attention where it has it, one dense call on a
(2, 16) batch of random ids, then pp.compile(ratio 0.4, backend eager, layer 0 skipped) on the same
batch. Outcomes: `pruned` (every site past layer 0 pruned), `partly`, `dense` (no site pruned),
`no sites` (the pass found no block), `not built` / `does not run` (transformers cannot build or
run the tiny config here), `does not compile` (torch.compile with the eager backend fails on the
model alone: not the pass's doing either), `crash` (the pass raised: a bug), and `out of memory` /
`timed out` (the child process hit --memory-gib or --seconds).

The child says which stage it is in (build, run, compile) before each, so that a child that dies
(a signal, an exception that escapes, the memory limit) is classified by what happened and where
(see `classify`), never as `not built` by default. $ARCHS_FAULT=STAGE:KIND makes the child fail on
purpose at that stage (KIND: crash, transformers, oom, kill, segv, hang): only to test `classify`
on real children.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import re
import resource
import signal
import subprocess
import sys
import time
import traceback
import warnings
from pathlib import Path

import torch
import transformers
from tabulate import tabulate
from transformers import AutoModelForCausalLM
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

import ppcompile as pp
from ppcompile.models import tiny_config
from protocol import provenance
from readme import replace_block

OPTIONS = {"ratio": 0.4, "skip_layers": (0,), "gather_cost": 0}  # every model type (backend eager); tiny: pruned at every size
STAGE = "# stage "  # the child's line before each stage: build, run, compile
DOING = {"build": "building the model", "run": "running the model dense", "compile": "compiling and running the pass",
         None: "starting"}
# what a process out of memory leaves on stderr: Python's error, torch's allocator's, C++'s
MEMORY_SIGNS = ("MemoryError", "can't allocate memory", "std::bad_alloc", "Cannot allocate memory")
PACKAGE = str(Path(pp.__file__).resolve().parent)


def _stage(name: str) -> None:
    print(STAGE + name, flush=True)
    _fault(name)


def sweep_one(model_type: str) -> dict:
    row = {"type": model_type, "outcome": None, "sites": 0, "pruned": 0, "dense": {}, "error": None}
    _stage("build")
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            try:
                model = AutoModelForCausalLM.from_config(tiny_config(model_type), attn_implementation="sdpa").eval()
            except (ValueError, ImportError):  # no sdpa path in this model: its own attention
                model = AutoModelForCausalLM.from_config(tiny_config(model_type)).eval()
    except Exception as e:  # noqa: BLE001 - transformers' own limits here are an outcome, not a crash
        return {**row, **_failed(e, "not built")}
    vocab = getattr(model.config, "vocab_size", None) or getattr(getattr(model.config, "text_config", None),
                                                                 "vocab_size", 256)
    ids = torch.randint(0, min(int(vocab), 256), (2, 16), generator=torch.Generator().manual_seed(0))
    _stage("run")
    try:
        with torch.no_grad():
            model(ids)
    except Exception as e:  # noqa: BLE001
        return {**row, **_failed(e, "does not run")}
    torch._dynamo.reset()
    _stage("compile")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            compiled = pp.compile(model, backend="eager", **OPTIONS)
            with torch.no_grad():
                compiled(ids)
    except Exception as e:  # noqa: BLE001 - the pass's fault, unless Dynamo fails on the model alone
        if _out_of_memory(e):  # the memory limit, not the pass's doing
            return {**row, "outcome": "out of memory", "error": f"{type(e).__name__}: {e}"[:200]}
        torch._dynamo.reset()
        try:
            with torch.no_grad():
                torch.compile(model, backend="eager")(ids)
        except Exception as plain:  # noqa: BLE001
            return {**row, "outcome": "does not compile", "error": f"{type(plain).__name__}: {plain}"[:200]}
        return {**row, "outcome": "crash", "error": _last_lines(e)}
    row["calls"] = dict(model.pp.runtime.counts)  # pruned_calls / unpruned_calls of the one call
    sites = [r for r in model.pp.summary() if _layer(r) != 0]
    pruned = [r for r in sites if r["status"] == "pruned"]
    dense = collections.Counter(f"{r.get('kind') or r['site'].rsplit('.', 1)[-1]}: {r['status']}" for r in sites if r["status"] != "pruned")
    outcome = "no sites" if not model.pp.summary() else "pruned" if len(pruned) == len(sites) else \
        "dense" if not pruned else "partly"
    return {**row, "outcome": outcome, "sites": len(sites), "pruned": len(pruned), "dense": dict(dense)}


def _out_of_memory(e: BaseException) -> bool:
    return isinstance(e, MemoryError) or any(sign in str(e) for sign in MEMORY_SIGNS)


def _in_ppcompile(frames: list[str]) -> bool:
    """Whether the innermost frame of a traceback (its files, outermost first) is ppcompile's."""
    return bool(frames) and frames[-1].startswith(PACKAGE)


def _failed(e: BaseException, outcome: str) -> dict:
    """A caught exception's outcome: out of memory, a crash if ppcompile's own code raised it
    (e.g. tiny_config), else `outcome` (transformers' limits)."""
    if _out_of_memory(e):
        return {"outcome": "out of memory", "error": f"{type(e).__name__}: {e}"[:200]}
    if _in_ppcompile([f.filename for f in traceback.extract_tb(e.__traceback__)]):
        return {"outcome": "crash", "error": _last_lines(e)}
    return {"outcome": outcome, "error": f"{type(e).__name__}: {e}"[:200]}


def _last_lines(e: BaseException) -> str:
    """A caught exception as _traceback_tail gives it: the exception, then its innermost frames."""
    where = [(f.filename, f.lineno, f.name) for f in traceback.extract_tb(e.__traceback__)]
    return _with_frames(f"{type(e).__name__}: {e}".strip().splitlines()[0][:200], where)


def _traceback_tail(tb: str) -> str:
    """A traceback's last lines on one line (a table cell): the exception first, then where, the
    innermost frames first ("ppcompile/config.py:79 in __post_init__")."""
    return _with_frames(_last_line(tb), re.findall(r'^\s*File "([^"]+)", line (\d+), in (\S+)', tb, flags=re.M))


def _with_frames(exception: str, frames: list[tuple], n: int = 3) -> str:
    at = "; ".join(f"{_short(f)}:{line} in {fn}" for f, line, fn in frames[::-1][:n])
    return f"{exception} (at {at})" if at else exception


def _short(path: str) -> str:
    """A frame's file, from its package down (ppcompile/..., transformers/..., torch/...)."""
    parts = Path(path).parts
    for i, part in enumerate(parts):
        if part in ("ppcompile", "transformers", "torch"):
            return "/".join(parts[i:])
    return Path(path).name


def _last_line(text: str, chars: int = 200) -> str:
    """The last line that says something (a traceback's: the exception), cut to `chars`."""
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[-1][:chars] if lines else ""


def _fault(stage: str) -> None:
    """$ARCHS_FAULT=STAGE:KIND: fail on purpose at `stage`, for tests of classify on real children."""
    where, _, kind = os.environ.get("ARCHS_FAULT", "").partition(":")
    if where != stage:
        return
    if kind == "crash":  # an exception inside ppcompile that nothing catches
        pp.PPConfig(ratio=2.0)
    if kind == "transformers":  # transformers' own building fails, uncaught
        transformers.AutoConfig.for_model("no-such-model-type")
    if kind == "oom":  # more than the memory limit
        bytearray(resource.getrlimit(resource.RLIMIT_AS)[0])
    if kind in ("kill", "segv"):  # what the kernel's OOM killer does; a crash in C code
        os.kill(os.getpid(), signal.SIGKILL if kind == "kill" else signal.SIGSEGV)
    if kind == "hang":
        time.sleep(3600)


def _layer(row: dict) -> int | None:
    """A site's layer: its row's, or (an unmatched block's row has none) the last index in its name."""
    if "layer" in row:
        return row["layer"]
    numbers = re.findall(r"\.(\d+)\.", row["site"])
    return int(numbers[-1]) if numbers else None


def isolated(model_type: str, memory_gib: float, seconds: float) -> dict:
    """sweep_one in a child process with a memory limit and a timeout: a model type whose tiny config
    still builds something huge (sub-configs the shrinking does not reach) is an outcome, not the
    end of the sweep."""
    try:
        out = subprocess.run([sys.executable, __file__, "--one", model_type, "--memory-gib", str(memory_gib)],
                             capture_output=True, text=True, timeout=seconds)
    except subprocess.TimeoutExpired as e:
        return classify(model_type, returncode=None, stdout=_text(e.stdout), stderr=_text(e.stderr),
                        memory_gib=memory_gib, seconds=seconds)
    return classify(model_type, returncode=out.returncode, stdout=out.stdout, stderr=out.stderr,
                    memory_gib=memory_gib, seconds=seconds)


def _text(output) -> str:
    """What a timed-out child wrote (bytes, even with text=True, or None)."""
    return output.decode(errors="replace") if isinstance(output, bytes) else output or ""


def classify(model_type: str, *, returncode: int | None, stdout: str, stderr: str, memory_gib: float,
             seconds: float) -> dict:
    """A child's row from how it ended. `returncode` None: it ran past `seconds`. Exit 0 with a
    row: that row. Otherwise by what happened, at the stage it last announced: out of memory
    (Python's, torch's or C++'s allocation error, or SIGKILL, what the kernel's OOM killer sends);
    an exception whose innermost frame is ppcompile's is a crash (with the traceback's last lines);
    an exception, a signal or an exit elsewhere while building is `not built`, while running the
    model dense `does not run`; anything else (the pass was running, or no stage began) a crash."""
    row = {"type": model_type, "outcome": None, "sites": 0, "pruned": 0, "dense": {}, "error": None}
    stages = [line[len(STAGE):].strip() for line in stdout.splitlines() if line.startswith(STAGE)]
    stage = stages[-1] if stages else None
    doing = DOING.get(stage, stage)
    if returncode is None:
        return {**row, "outcome": "timed out", "error": f"timed out after {seconds:.0f} s (--seconds) {doing}"}
    lines = [line for line in stdout.splitlines() if line.startswith("{")]
    if returncode == 0 and lines:
        return json.loads(lines[-1])
    tb = stderr[stderr.rfind("Traceback (most recent call last):"):] if "Traceback (most recent" in stderr else ""
    how = _ending(returncode)
    if returncode == -signal.SIGKILL or any(sign in stderr for sign in MEMORY_SIGNS):
        return {**row, "outcome": "out of memory",
                "error": _said(f"{how} {doing}, memory limit {memory_gib:g} GiB (--memory-gib)", _last_line(stderr))}
    if tb and _in_ppcompile(re.findall(r'^\s*File "([^"]+)", line \d+', tb, flags=re.M)):
        return {**row, "outcome": "crash", "error": _said(f"{how} {doing}", _traceback_tail(tb))}
    outcome = {"build": "not built", "run": "does not run"}.get(stage, "crash")
    said = _traceback_tail(tb) if tb and outcome == "crash" else _last_line(tb or stderr)
    return {**row, "outcome": outcome, "error": _said(f"{how} {doing}", said)}


def _said(what: str, detail: str) -> str:
    return f"{what}: {detail}" if detail else what


def _ending(returncode: int) -> str:
    if returncode < 0:
        return f"killed by {signal.Signals(-returncode).name}"
    return f"exited with {returncode}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--types", help="comma-separated model types (default: every registered causal LM)")
    p.add_argument("--json", type=Path)
    p.add_argument("--readme", action="store_true", help="write the summary into README.md and the table into docs/archs.md")
    p.add_argument("--from-json", type=Path, help="report the rows of an earlier --json run (no sweep)")
    p.add_argument("--memory-gib", type=float, default=6.0, help="memory limit of each model type's process")
    p.add_argument("--seconds", type=float, default=300.0, help="time limit of each model type's process")
    p.add_argument("--one", help=argparse.SUPPRESS)  # the child: one type, its row as JSON on stdout
    args = p.parse_args()
    if args.one:
        limit = int(args.memory_gib * 2**30)
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
        print(json.dumps(sweep_one(args.one)))
        return
    types = args.types.split(",") if args.types else sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)
    rows = json.loads(args.from_json.read_text()) if args.from_json else []
    made_with = provenance(config=pp.PPConfig(**OPTIONS), dtype=torch.get_default_dtype())  # every child's
    for t in [] if args.from_json else types:
        start = time.perf_counter()
        rows.append({**isolated(t, args.memory_gib, args.seconds), "provenance": made_with})
        r = rows[-1]
        print(f"{t}: {r['outcome']} {r['pruned']}/{r['sites']} {r['error'] or ''} ({time.perf_counter() - start:.1f} s)",
              flush=True)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")
    table = per_type(rows)
    print(table)
    summary = report(rows)
    print("\n" + summary)
    if args.readme:
        replace_block("archs", summary)
        DOC.write_text(f"# Every registered causal LM through the pass\n\nWritten by `python bench/archs.py --readme` "
                       f"({_context()}).\n\n{summary}\n\n## Per model type\n\n{table}\n")


OUTCOMES = ("pruned", "partly", "dense", "no sites", "crash", "not built", "does not run", "does not compile",
            "out of memory", "timed out")
DOC = Path(__file__).resolve().parents[1] / "docs" / "archs.md"


def per_type(rows: list[dict]) -> str:
    return tabulate([[r["type"], r["outcome"], f"{r['pruned']}/{r['sites']}",
                      "; ".join(f"{k} x{v}" for k, v in r["dense"].items()) or (r["error"] or "")[:120]] for r in rows],
                    headers=["model type", "outcome", "pruned sites (past layer 0)", "dense reasons / error"],
                    tablefmt="github")


def reason(key: str) -> str:
    """A dense reason without the node names and layer numbers that differ between models."""
    kind, why = key.split(": ", 1)
    why = why.removeprefix("dense: ")
    why = re.sub(r" \([\w.]+\)", "", why)  # "op gt (gt_7) has ..." -> "op gt has ..."
    why = re.sub(r"^\w+: ", "", why)  # "variance_5: slices ..." -> "slices ..."
    why = re.sub(r"\.\d+\.", ".N.", why)
    return f"{kind}: {why}"


def report(rows: list[dict]) -> str:
    """The counts per outcome with their model types, and each dense reason with its model types."""
    by = collections.defaultdict(list)
    for r in rows:
        by[r["outcome"]].append(r["type"])
    counts = ", ".join(f"{k} {len(by[k])}" for k in OUTCOMES if by[k])
    outcomes = tabulate([[k, len(by[k]), ", ".join(by[k])] for k in OUTCOMES if by[k]],
                        headers=["outcome", "model types", ""], tablefmt="github")
    reasons = collections.defaultdict(set)
    for r in rows:
        for key in r["dense"]:
            reasons[reason(key)].add(r["type"])
    dense = tabulate([[why, len(types), ", ".join(sorted(types))] for why, types in
                      sorted(reasons.items(), key=lambda kv: (-len(kv[1]), kv[0]))],
                     headers=["block left dense: reason", "model types", ""], tablefmt="github")
    return (f"{len(rows)} causal-LM model types of transformers {transformers.__version__}, each built from a tiny "
            f"random config (3 layers, hidden 64, 4 heads), through `pp.compile(ratio=0.4, backend='eager', "
            f"skip_layers=(0,), gather_cost=0)` on a (2, 16) batch: {counts}.\n\n{outcomes}\n\n{dense}\n\n"
            f"`pruned`: every block past layer 0 pruned; `partly`: some; `dense`: none (each with its reason); "
            f"`not built` / `does not run`: transformers cannot build or run the tiny config here; `does not "
            f"compile`: torch.compile with the eager backend fails on the model alone (neither is the pass); "
            f"`crash`: the pass raised (a bug).{_limits_legend(by)}")


def _limits_legend(by: dict) -> str:
    """The legend of the outcomes only a child's limits give, where some row has one (the text of a
    sweep without them stays as it was)."""
    if not (by["out of memory"] or by["timed out"]):
        return ""
    return (" `out of memory` / `timed out`: the model type's process hit its memory or time limit "
            "(--memory-gib, --seconds).")


def _context() -> str:
    return f"torch {torch.__version__}, transformers {transformers.__version__}"


if __name__ == "__main__":
    main()
