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
model alone: not the pass's doing either), and `crash` (the pass raised: a bug).
"""
from __future__ import annotations

import argparse
import collections
import json
import re
import resource
import subprocess
import sys
import time
import warnings
from pathlib import Path

import torch
import transformers
from tabulate import tabulate
from transformers import AutoModelForCausalLM
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

import ppcompile as pp
from ppcompile.models import tiny_config
from readme import replace_block

def sweep_one(model_type: str) -> dict:
    row = {"type": model_type, "outcome": None, "sites": 0, "pruned": 0, "dense": {}, "error": None}
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            try:
                model = AutoModelForCausalLM.from_config(tiny_config(model_type), attn_implementation="sdpa").eval()
            except (ValueError, ImportError):  # no sdpa path in this model: its own attention
                model = AutoModelForCausalLM.from_config(tiny_config(model_type)).eval()
    except Exception as e:  # noqa: BLE001 - transformers' own limits here are an outcome, not a crash
        return {**row, "outcome": "not built", "error": f"{type(e).__name__}: {e}"[:200]}
    vocab = getattr(model.config, "vocab_size", None) or getattr(getattr(model.config, "text_config", None),
                                                                 "vocab_size", 256)
    ids = torch.randint(0, min(int(vocab), 256), (2, 16), generator=torch.Generator().manual_seed(0))
    try:
        with torch.no_grad():
            model(ids)
    except Exception as e:  # noqa: BLE001
        return {**row, "outcome": "does not run", "error": f"{type(e).__name__}: {e}"[:200]}
    torch._dynamo.reset()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            compiled = pp.compile(model, 0.4, backend="eager", skip_layers=(0,))
            with torch.no_grad():
                compiled(ids)
    except Exception as e:  # noqa: BLE001 - the pass's fault, unless Dynamo fails on the model alone
        torch._dynamo.reset()
        try:
            with torch.no_grad():
                torch.compile(model, backend="eager")(ids)
        except Exception as plain:  # noqa: BLE001
            return {**row, "outcome": "does not compile", "error": f"{type(plain).__name__}: {plain}"[:200]}
        return {**row, "outcome": "crash", "error": f"{type(e).__name__}: {e}"[:300]}
    sites = [r for r in model.pp.summary() if _layer(r) != 0]
    pruned = [r for r in sites if r["status"] == "pruned"]
    dense = collections.Counter(f"{r.get('kind') or r['site'].rsplit('.', 1)[-1]}: {r['status']}" for r in sites if r["status"] != "pruned")
    outcome = "no sites" if not model.pp.summary() else "pruned" if len(pruned) == len(sites) else \
        "dense" if not pruned else "partly"
    return {**row, "outcome": outcome, "sites": len(sites), "pruned": len(pruned), "dense": dict(dense)}


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
    except subprocess.TimeoutExpired:
        return {"type": model_type, "outcome": "not built", "sites": 0, "pruned": 0, "dense": {},
                "error": f"timed out after {seconds:.0f} s"}
    lines = [line for line in out.stdout.splitlines() if line.startswith("{")]
    if out.returncode != 0 or not lines:
        return {"type": model_type, "outcome": "not built", "sites": 0, "pruned": 0, "dense": {},
                "error": f"the child exited with {out.returncode} (memory limit {memory_gib} GiB?)"}
    return json.loads(lines[-1])


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
    for t in [] if args.from_json else types:
        start = time.perf_counter()
        rows.append(isolated(t, args.memory_gib, args.seconds))
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


OUTCOMES = ("pruned", "partly", "dense", "no sites", "crash", "not built", "does not run", "does not compile")
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
            f"skip_layers=(0,))` on a (2, 16) batch: {counts}.\n\n{outcomes}\n\n{dense}\n\n"
            f"`pruned`: every block past layer 0 pruned; `partly`: some; `dense`: none (each with its reason); "
            f"`not built` / `does not run`: transformers cannot build or run the tiny config here; `does not "
            f"compile`: torch.compile with the eager backend fails on the model alone (neither is the pass); "
            f"`crash`: the pass raised (a bug).")


def _context() -> str:
    return f"torch {torch.__version__}, transformers {transformers.__version__}"


if __name__ == "__main__":
    main()
