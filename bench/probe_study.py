"""The probe study (issue 14): probe designs at equal FLOPs budgets, on the real model and real
text, against the full-batch oracle. Per (text, batch, ratio, design, budget, history), the
perplexity as a multiple of dense and pp's perplexity increase over the oracle's,
(pp - dense) / (oracle - dense), medians over calibration seeds.

    python bench/probe_study.py                     # the whole default grid (hours on 2 cores)
    python bench/probe_study.py --texts brown:a --batches 8 --ratios 0.4 --seeds 0,1   # one slice
    python bench/probe_study.py --report            # table, plot and README from the rows so far

Each evaluated variant is one line of bench/results/probe_study_<model>[_<dtype>].jsonl; a rerun
skips what the file already has, so the grid runs in slices (and survives an interrupted run).
Variants that use no calibration (the oracle, dense, pp without history) run at the first seed
only. `budget none` is each design without probe_budget (`paper`: position_ratio 0.5 of one
sequence in 20; `every`/`spread`: as many tokens, over every sequence). The probe's FLOPs (torch's
counter, pp.explain on the first batch) are recorded per variant as a fraction of dense.
"""
from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch
from tabulate import tabulate

import ppcompile as pp
from ppcompile import data
from ppcompile.calibration import collect
from ppcompile.evaluate import evaluate
from ppcompile.methods import build_method
from ppcompile.models import dtype_name, dtype_suffix, parse_dtype
from ppcompile.workloads import device_name, load
from protocol import Methods, label
from readme import model_name, replace_block
from ppcompile.probes import PROBES

ROOT = Path(__file__).resolve().parent.parent


def _list(kind):
    return lambda s: [kind(x) for x in s.split(",") if x]


def _budget(s: str) -> float | None:
    return None if s == "none" else float(s)


def variants(designs, budgets, ratios, history) -> list[dict]:
    """The pp variants of one (text, batch, seed) group, as PPConfig options with the ratio."""
    return [{"ratio": r, "probe": d, "probe_budget": b, "history": h}
            for r in ratios for d in designs for b in budgets for h in history]


def key(row: dict) -> tuple:
    """What identifies an evaluated variant (a rerun skips rows with a key already in the file)."""
    return (row["text"], row["batch_size"], row["seed"], row["method"], row["ratio"], row["probe"],
            row["probe_budget"], row["history"])


def run_group(model, tokenizer, args, text: str, batch: int, seed: int, first_seed: bool, cal, done: set) -> list[dict]:
    """Evaluate, on `text` at `batch`, every variant of the grid not yet in `done`."""
    windows = data.token_windows(data.split_disjoint(text, args.calibration)[0], tokenizer, args.seq_len,
                                 n_windows=args.windows)
    base = {"text": text, "batch_size": batch, "model": args.model, "dtype": dtype_name(args.dtype),
            "seq_len": args.seq_len, "windows": args.windows, "calibration": args.calibration,
            "calibration_windows": args.calibration_windows, "backend": args.backend, "torch": torch.__version__,
            "device": device_name()}
    todo = []  # (row without results, builder)
    if first_seed:
        todo.append(({"method": "dense", "ratio": 0.0, "probe": None, "probe_budget": None, "history": None,
                      "seed": None}, {}))
        todo += [({"method": "full-batch", "ratio": r, "probe": None, "probe_budget": None, "history": None,
                   "seed": None}, {}) for r in args.ratios]
    todo += [({"method": m, "ratio": r, "probe": None, "probe_budget": None, "history": None, "seed": seed}, {})
             for m in args.baselines for r in args.ratios]  # static: calibrated, so once per seed
    for v in variants(args.designs, args.budgets, args.ratios, args.history):
        if not v["history"] and not first_seed:
            continue  # no calibration: the same at every seed
        todo.append(({"method": "pp", **v, "seed": seed if v["history"] else None},
                     {k: v[k] for k in ("probe", "probe_budget", "history")}))
    todo = [(r, o) for r, o in todo if key({**base, **r}) not in done]
    if not todo:
        return []
    torch._dynamo.reset()
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, len(todo) + 2)
    first = next(data.iter_batches(windows, batch))
    fns, rows, flops, options_of = {}, {}, {}, {}
    for row, options in todo:
        name = label(row["method"], row["ratio"], **options)  # pp@0.4 probe=paper probe_budget=null history=true
        shape = (options.get("probe"), options.get("probe_budget"))
        if row["method"] == "pp" and shape not in flops:  # the probe's FLOPs at this shape, by torch's counter
            e = pp.explain(model, first, row["ratio"], **options)
            flops[shape] = e.flops["probe"] / e.flops["dense"]
            torch._dynamo.reset()
        if row["method"] == "pp":
            row["probe_flops"] = flops[shape]
        rows[name], options_of[name] = {**base, **row}, options
    made = Methods()  # the session of each method, to check after the evaluation that it ran pruned
    for name, row in rows.items():
        fns[name] = made.build(name, build_method, row["method"], model, row["ratio"],
                               None if row["method"] == "full-batch" else cal, args.backend, **options_of[name])
    reference = next((name for name, row in rows.items() if row["method"] == "dense"), None)
    results = evaluate(fns, data.iter_batches(windows, batch), reference=reference, progress=args.progress)
    made.check()
    out = []
    for r in results:
        out.append({**rows[r.method], "ppl": r.ppl, "kl": r.kl, "top1": r.top1, "tokens": r.tokens,
                    "provenance": made.provenance(r.method, dtype=args.dtype)})
    return out


def _calibration(model, tokenizer, args, seed: int):
    docs = data.load_documents(args.calibration)
    windows = data.token_windows(docs, tokenizer, args.seq_len, n_windows=args.calibration_windows,
                                 mode="random", seed=seed)
    return collect(model, data.iter_batches(windows, 8), progress=args.progress,
                   meta={"text": args.calibration, "windows": args.calibration_windows, "seq_len": args.seq_len,
                         "seed": seed})


def summarize(rows: list[dict]) -> list[dict]:
    """One line per (text, batch, ratio, design, budget, history): medians over the seeds of the
    multiple of dense and of the increase over the oracle's."""
    dense = {(r["text"], r["batch_size"]): r["ppl"] for r in rows if r["method"] == "dense"}
    oracle = {(r["text"], r["batch_size"], r["ratio"]): r["ppl"] for r in rows if r["method"] == "full-batch"}
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        if r["method"] not in ("dense", "full-batch") and (r["text"], r["batch_size"]) in dense:
            what = r["probe"] if r["method"] == "pp" else r["method"]  # a static baseline in the probe column
            groups.setdefault((r["text"], r["batch_size"], r["ratio"], what, r["probe_budget"], r["history"]),
                              []).append(r)
    out = []
    for (text, batch, ratio, probe, budget, history), rs in sorted(groups.items(), key=lambda kv: str(kv[0])):
        d, o = dense[text, batch], oracle.get((text, batch, ratio))
        mult = [r["ppl"] / d for r in rs]
        vs = [(r["ppl"] - d) / (o - d) for r in rs] if o else []
        out.append({"text": text, "batch": batch, "ratio": ratio, "probe": probe, "budget": budget,
                    "history": history, "seeds": len(rs),
                    "probe_flops": statistics.median(r.get("probe_flops", 0.0) for r in rs),
                    "x_dense": statistics.median(mult), "oracle_x_dense": o / d if o else None,
                    "vs_oracle": statistics.median(vs) if vs else None,
                    "vs_oracle_range": (min(vs), max(vs)) if vs else None})
    return out


def table(summary: list[dict]) -> str:
    body = [[s["text"], s["batch"], s["ratio"], s["probe"],
             "-" if s["history"] is None else "none" if s["budget"] is None else f"{s['budget']:.1%}",
             "-" if s["history"] is None else "on" if s["history"] else "off", s["seeds"],
             f"{s['probe_flops']:.2%}", f"{s['x_dense']:.3f}",
             f"{s['oracle_x_dense']:.3f}" if s["oracle_x_dense"] else "-",
             f"{s['vs_oracle']:.3f}" if s["vs_oracle"] is not None else "-",
             f"{s['vs_oracle_range'][0]:.3f}-{s['vs_oracle_range'][1]:.3f}" if s["seeds"] > 1 else "-"]
            for s in summary]
    headers = ["text", "batch", "ratio", "probe", "budget", "history", "seeds", "probe FLOPs", "x dense",
               "oracle x dense", "increase / oracle's", "range"]
    return tabulate(body, headers=headers, tablefmt="github")


def pivot(summary: list[dict], batch: int, ratio: float) -> str:
    """At one batch and ratio: one line per design (and history), one column per (text, budget):
    pp's perplexity increase over the oracle's, median over the seeds, with the probe's FLOPs."""
    pick = [s for s in summary if (s["batch"], s["ratio"]) == (batch, ratio) and s["history"] is not None]
    cols = sorted({(s["text"], s["budget"]) for s in pick}, key=lambda c: (c[0], -1 if c[1] is None else c[1]))
    lines = {}
    for s in pick:
        lines.setdefault((s["probe"], s["history"]), {})[s["text"], s["budget"]] = s
    body = []
    for (probe, history), cells in sorted(lines.items(), key=lambda kv: (list(PROBES).index(kv[0][0]), not kv[0][1])):
        body.append([probe, "on" if history else "off"] + [
            f"{cells[c]['vs_oracle']:.2f} ({cells[c]['probe_flops']:.2%}, {cells[c]['seeds']})" if c in cells else ""
            for c in cols])
    headers = ["probe", "history"] + [f"{t}, {'none' if b is None else f'{b:.1%}'}" for t, b in cols]
    return tabulate(body, headers=headers, tablefmt="github")


def report(summary: list[dict]) -> str:
    """The README's tables: one pivot per (batch, ratio) measured, batch 8 at ratio 0.4 first."""
    shapes = sorted({(s["batch"], s["ratio"]) for s in summary if s["history"] is not None},
                    key=lambda br: (br != (8, 0.4), br[1] != 0.4, br[0]))
    return "\n\n".join(f"Batch {b}, ratio {r}: pp's perplexity increase over the oracle's (probe FLOPs as a "
                        f"share of the dense model's, seeds)\n\n{pivot(summary, b, r)}" for b, r in shapes)


def plot(summary: list[dict], path: Path, text: str, batch: int, ratio: float) -> Path | None:
    """Quality vs probe FLOPs at one (text, batch, ratio), one line per design (history on)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    pick = [s for s in summary if (s["text"], s["batch"], s["ratio"]) == (text, batch, ratio) and s["history"]
            and s["vs_oracle"] is not None]
    if not pick:
        return None
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for design in PROBES:
        pts = sorted((s["probe_flops"] * 100, s["vs_oracle"]) for s in pick if s["probe"] == design)
        if pts:
            ax.plot(*zip(*pts), marker="o", label=design)
    ax.axhline(1.0, color="gray", lw=0.8, ls="--")
    ax.set_xlabel("probe FLOPs, % of dense (torch's counter)")
    ax.set_ylabel("perplexity increase / the oracle's")
    ax.set_title(f"{pick[0].get('model', '')} {text}, batch {batch}, ratio {ratio}, with history")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--texts", type=_list(str), default=["brown:a", "brown:jk"],
                   help="brown:a is the development text; the second is held out (never tuned on)")
    p.add_argument("--calibration", default="brown:fgh")
    p.add_argument("--calibration-windows", type=int, default=64)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--windows", type=int, default=32, help="evaluation windows per text")
    p.add_argument("--batches", type=_list(int), default=[1, 8, 16])
    p.add_argument("--ratios", type=_list(float), default=[0.2, 0.4])
    p.add_argument("--designs", type=_list(str), default=list(PROBES))
    p.add_argument("--budgets", type=_list(_budget), default=[None, 0.01, 0.015, 0.03])
    p.add_argument("--history", type=_list(lambda s: {"on": True, "off": False}[s]), default=[True, False])
    p.add_argument("--seeds", type=_list(int), default=[0, 1, 2])
    p.add_argument("--baselines", type=_list(str), default=[],
                   help="static methods to evaluate beside, at each ratio and seed (e.g. wanda-sp,flap)")
    p.add_argument("--dtype", type=parse_dtype, default=torch.bfloat16)
    p.add_argument("--backend", choices=["inductor", "eager"], default="eager")
    p.add_argument("--report", action="store_true", help="only summarize the rows so far")
    p.add_argument("--no-readme", action="store_true")
    p.add_argument("--progress", action="store_true")
    p.add_argument("--out", type=Path, help="default bench/results/probe_study_<model>[_<dtype>].jsonl")
    args = p.parse_args()
    out = args.out or ROOT / f"bench/results/probe_study_{args.model}{dtype_suffix(args.dtype)}.jsonl"
    rows = [json.loads(line) for line in out.read_text().splitlines()] if out.is_file() else []
    if not args.report:
        model, tokenizer = load(args.model, args.seq_len, args.dtype)
        done = {key(r) for r in rows}
        for i, seed in enumerate(args.seeds):
            cal = _calibration(model, tokenizer, args, seed) if True in args.history or args.baselines else None
            for text in args.texts:
                for batch in args.batches:
                    new = run_group(model, tokenizer, args, text, batch, seed, i == 0, cal, done)
                    with out.open("a") as f:
                        for r in new:
                            f.write(json.dumps(r) + "\n")
                    rows += new
                    done |= {key(r) for r in new}
                    print(f"seed {seed}, {text}, batch {batch}: {len(new)} variants", flush=True)
    summary = summarize(rows)
    print(table(summary) + "\n")
    text = report(summary)
    r = rows[0]
    context = (f"{model_name(r['model'])} in {r['dtype']}, the first {r['windows']} non-overlapping {r['seq_len']}-token windows of each "
               f"text, calibration {r['calibration_windows']} seeded-random windows of {r['calibration']} per seed "
               f"(seeds {', '.join(str(s) for s in sorted({x['seed'] for x in rows if x['seed'] is not None}))}); "
               f"pruned methods with backend {r['backend']}; torch {r['torch']}, {r['device']}")
    print(f"{text}\n\n{context}.")  # the README's block
    out.with_suffix(".json").write_text(json.dumps(summary, indent=2) + "\n")
    picture = plot(summary, out.with_suffix(".png") if args.out else ROOT / "docs" / f"{out.stem}.png", "brown:a", 8, 0.4)
    if picture:
        print(f"wrote {picture}")
    if not args.no_readme:
        replace_block("probe-study", f"{text}\n\n{context}.")


if __name__ == "__main__":
    main()
