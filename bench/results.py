"""Refill every generated block of docs/results.md, and the README's headline block, from the JSON
files in bench/results/: one command, no model run.

    python bench/results.py               # in place: docs/results.md and README.md
    python bench/results.py --into DIR    # into copies (DIR/docs/results.md, DIR/README.md), made first
    python bench/results.py --check       # into a temporary copy; exit 1 with the diff if they differ

Each block is what a bench prints from its JSON: the benches that write their own block
(quality, shards, probe_speed, probe_study, archs) run their --from-json / --report path in this
process and write it through bench/readme.py; for speed.py and generate.py, whose --from-json
path only prints, this script writes what they print, with a line of provenance read from the
same JSON (model, dtype, machine, torch). Two tables are made here from the JSON: the serving
stream (speed.py --from-json does not read stream rows) and the README's headline.
Running it twice leaves the files unchanged; a block in either file that nothing fills is an
error, as is a listed block the files lack.
"""
from __future__ import annotations

import argparse
import contextlib
import difflib
import importlib
import io
import json
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

from tabulate import tabulate

import readme
from readme import model_name

ROOT = Path(__file__).resolve().parents[1]
RES = ROOT / "bench" / "results"


def _rel(p: Path) -> str:
    return str(p.relative_to(ROOT))


def _json(name: str) -> list[dict]:
    return json.loads((RES / name).read_text())


def _run(module: str, *argv) -> str:
    """Run bench `module`'s main() with `argv` in this process; what it printed."""
    mod = importlib.import_module(module)
    old, sys.argv = sys.argv, [f"bench/{module}.py", *map(str, argv)]
    try:
        with contextlib.redirect_stdout(io.StringIO()) as out:
            mod.main()
    finally:
        sys.argv = old
    return out.getvalue().rstrip()


def _one(rows: list[dict], key: str, default=None) -> str:
    return ", ".join(sorted({str(r.get(key, default)) for r in rows}))


def _provenance(rows: list[dict], files: list[str], command: str) -> str:
    models = "; ".join(model_name(m) for m in sorted({r["model"] for r in rows}))
    dtype = _one(rows, "dtype", "float32") + (" (an empty dtype cell: float32)" if any("dtype" not in r for r in rows) else "")
    return (f"{models}; {dtype}; {_one(rows, 'machine')}{_cpus(rows)}, "
            f"torch {_one(rows, 'torch')}; from {', '.join(files)}. Printed by `{command}`")


def _cpus(rows: list[dict]) -> str:
    """", on CPU (its bf16 unit)" for the rows that recorded them (provenance.cpu, .cpu_bf16), so that a
    block says which machine it ran on; "" for rows older than that record."""
    seen = {(p["cpu"], p.get("cpu_bf16")) for r in rows if (p := r.get("provenance") or {}).get("cpu")}
    named = sorted(f"{cpu} ({unit})" if unit else cpu for cpu, unit in seen)
    return f", on {' and '.join(named)}" if named else ""


# ---- the blocks speed.py and generate.py print without provenance
def _printed(bench: str, files: tuple[str, ...]) -> tuple[list[Path], list[dict], str, str]:
    """What `bench --from-json files` prints: (paths, their rows, the command, the text)."""
    paths = [RES / f for f in files]
    rows = [r for p in paths for r in json.loads(p.read_text())]
    command = f"python bench/{bench}.py --from-json " + " ".join(_rel(p) for p in paths)
    return paths, rows, command, _run(bench, "--from-json", *paths)


def speed(block: str, *files: str) -> None:
    paths, rows, command, text = _printed("speed", files)
    readme.replace_block(block, f"{text}\n\nOne forward call of random token ids per row (batch x seq_len), seconds: "
                                f"the median of the timed rounds; every method of a file in one process, interleaved. "
                                f"{_provenance(rows, [_rel(p) for p in paths], command)}.")


def generate(block: str, *files: str) -> None:
    paths, rows, command, text = _printed("generate", files)
    if "greedy_agreement" in rows[0]:
        seeds = ", ".join(str(s) for s in sorted({r["seed"] for r in rows}))
        windows = {r["tokens"] * 2 // r["seq_len"] for r in rows}
        note = (f"Text {_one(rows, 'data')}: {', '.join(map(str, sorted(windows)))} windows of {_one(rows, 'seq_len')} "
                f"tokens, the first half of each the prompt that selects, the second half scored; calibration seeds "
                f"{seeds} (`seeds`: how many a row's median is over). ")
    else:
        note = (f"Random token ids, batch x prompt per row, `new` tokens generated into one static cache of "
                f"{_one(rows, 'cache_len')} positions; medians of the timed rounds, every method in one process, "
                f"interleaved. ")
    readme.replace_block(block, f"{text}\n\n{note}{_provenance(rows, [_rel(p) for p in paths], command)}.")


def stream(block: str, *files: str) -> None:
    """speed.py's stream table (the columns its --stream run prints), from its JSON."""
    rows = [r for f in files for r in _json(f)]
    cols = ["model", "method", "stream", "max_batch", "max_len", "ratio", "tokens", "graphs", "seconds",
            "compile_s", "us_per_token", "us_per_token_steady", "vs_dense", "vs_dense_steady"]
    text = tabulate([[r[c] for c in cols] for r in rows], headers=cols, floatfmt=".3g", tablefmt="github")
    readme.replace_block(block, f"{text}\n\n`stream` batches of random token ids, batch 1-`max_batch`, sequence "
                                f"8-`max_len`, served by dense and pp in turn, each compiled once; `graphs`: graphs "
                                f"compiled; `_steady`: without the compile time. "
                                f"{_provenance(rows, ['bench/results/' + f for f in files], 'python bench/results.py')}.")


def vllm(block: str, file: str, *flags: str, doc: Path | None = None) -> None:
    """vllm_serve.py's table: dense vLLM vs pp inside vLLM, serving a stream of requests."""
    readme.replace_block(block, _run("vllm_serve", "--from-json", RES / file, *flags), doc)


# ---- the README's headline
def headline() -> str:
    quality = importlib.import_module("quality")
    q = _json("quality_smollm2_brown-a.json")
    multiples = quality._multiples(q)  # the quality bench's own: (method, ratio) -> seed -> ppl / dense
    ppl = {}
    for r in q:
        ppl.setdefault((r["method"], r["ratio"]), []).append(r["ppl"])
    small, big = "speed_smollm2-135m_cpu_bfloat16_headline.json", "speed_llama-2b-shaped_cpu_bfloat16_mask_run2.json"
    speeds = [{(r["method"], r["ratio"]): r["vs_dense"] for r in _json(f) if (r["batch"], r["seq_len"]) == (8, 512)}
              for f in (small, big)]
    body = []
    for method, ratio in [("dense", 0.0), ("pp", 0.2), ("pp", 0.4), ("wanda-sp", 0.2), ("wanda-sp", 0.4),
                          ("flap", 0.2), ("flap", 0.4)]:
        x = list(multiples[method, ratio].values())
        body.append([method, "-" if method == "dense" else ratio, f"{statistics.median(ppl[method, ratio]):.2f}",
                     f"{statistics.median(x):.2f} ({min(x):.2f}-{max(x):.2f})",
                     *(f"{s[method, ratio]:.3g}" if (method, ratio) in s else "not measured" for s in speeds)])
    table = tabulate(body, headers=["method", "ratio", "perplexity", "perplexity x dense (range)",
                                    "time x dense: SmolLM2, bf16", "time x dense: LLaMA-2B-shaped, bf16"],
                     tablefmt="github")
    r, s = q[0], _json(big)[0]
    probe = {x["provenance"]["probe"] for f in (small, big) for x in _json(f) if x["method"] == "pp"}
    seeds = sorted({x["calibration"]["seed"] for x in q})
    cal = r["calibration"]
    return (f"{table}\n\nPerplexity: {model_name(r['model'])} in float32, text {r['text']} (the first "
            f"{r['batches'] * r['batch_size']} non-overlapping {r['seq_len']}-token windows, batch {r['batch_size']}), "
            f"calibration {cal['windows']} random {cal['seq_len']}-token windows of {cal['text']}; median over "
            f"calibration seeds {', '.join(map(str, seeds))} (range: min-max); pp with the paper's probe (probe=paper); "
            f"{r['device']}, torch {r['torch']} (bench/results/quality_smollm2_brown-a.json). Time: one forward call "
            f"of batch 8 x sequence 512 random token ids, relative to dense compiled by torch.compile (Inductor), "
            f"all in bfloat16, medians of rounds with the methods interleaved in one process, ratio per row; "
            f"SmolLM2 is the model above, LLaMA-2B-shaped is {model_name(s['model'])}; pp with the default probe "
            f"({', '.join(sorted(probe))}); {s['provenance']['cpu']}, {s['machine']}, torch {s['torch']} "
            f"(bench/results/{small}, bench/results/{big}). "
            f"Printed by `python bench/results.py`; every figure's section: docs/results.md")


# ---- every block, in the order of docs/results.md
def fill(tmp: Path) -> list[str]:
    """Fill every block; the names written (`tmp`: a scratch folder)."""
    del readme.WRITTEN[:]
    _run("quality", "--from-json", RES / "quality_smollm2_brown-a.json")
    _run("quality", "--from-json", RES / "quality_smollm2_brown-a_bfloat16.json")
    study = tmp / "probe_study_smollm2-135m_bfloat16.jsonl"  # --report writes a summary and a plot beside it
    shutil.copy(RES / study.name, study)
    _run("probe_study", "--report", "--out", study)
    _run("probe_speed", "--from-json", RES / "probe_speed_llama-2b-shaped_bfloat16.json")
    speed("speed-fp32", "speed_llama-2b-shaped_cpu.json", "speed_llama-2b-shaped-gqa_cpu.json",
          "speed_llama-2b-shaped_cpu_shapes.json", "speed_smollm2-135m_cpu.json")
    speed("compile-fp32", "compile_llama-2b-shaped_cpu.json", "compile_smollm2-135m_cpu.json")
    speed("compile-bf16", "speed_smollm2-135m_cpu_bfloat16_compile.json")
    speed("compile-after-probe-sizes", "speed_smollm2-135m_cpu_compile_after_probe_sizes.json")
    speed("speed-bfloat16", "speed_llama-2b-shaped_cpu_bfloat16.json", "speed_llama-2b-shaped_cpu_bfloat16_shapes.json",
          "speed_llama-2b-shaped-gqa_cpu_bfloat16.json", "speed_smollm2-135m_cpu_bfloat16.json")
    speed("speed-bfloat16-run1", "speed_llama-2b-shaped_cpu_bfloat16_run1.json")
    speed("speed-bfloat16-budget", "speed_llama-2b-shaped_cpu_bfloat16_budget.json",
          "speed_smollm2-135m_cpu_bfloat16_budget.json")
    speed("speed-bfloat16-avx512", "speed_smollm2-135m_cpu_bfloat16_avx512.json",
          "speed_llama-2b-shaped_cpu_bfloat16_avx512.json")
    speed("speed-bfloat16-avx512-batch1", "speed_smollm2-135m_cpu_bfloat16_avx512_small.json")
    speed("compile-bfloat16-avx512", "speed_smollm2-135m_cpu_bfloat16_avx512_compile.json")
    speed("speed-fp32-avx2", "speed_smollm2-135m_cpu_avx2_batch1.json", "speed_smollm2-135m_cpu_avx2.json")
    speed("cost-breakeven-avx2", "speed_smollm2-135m_cpu_avx2_breakeven.json", "speed_smollm2-135m_cpu_avx2_batch1_c96.json")
    speed("compile-fp32-avx2", "speed_smollm2-135m_cpu_avx2_compile_1x128.json",
          "speed_smollm2-135m_cpu_avx2_compile_8x512_run1.json", "speed_smollm2-135m_cpu_avx2_compile_8x512_run2.json",
          "speed_smollm2-135m_cpu_avx2_compile_8x512_run3.json")
    speed("compile-layers-fp32-avx2", "speed_smollm2-135m_cpu_avx2_compile_8x512_layers.json",
          "speed_smollm2-135m_cpu_avx2_compile_8x512_layers_run2.json")
    speed("layers-bf16-amx", "speed_smollm2-135m_cpu_bfloat16_layers.json", "speed_smollm2-135m_cpu_bfloat16_layers_run2.json",
          "speed_llama-2b-shaped_cpu_bfloat16_layers.json")
    speed("segments-ab-bf16-amx", "speed_smollm2-135m_cpu_bfloat16_segments_before.json",
          "speed_smollm2-135m_cpu_bfloat16_segments_after.json")
    speed("mask-bf16-amx", "speed_smollm2-135m_cpu_bfloat16_mask.json", "speed_llama-2b-shaped_cpu_bfloat16_mask.json",
          "speed_llama-2b-shaped_cpu_bfloat16_mask_run2.json")
    speed("headline-bf16-amx", "speed_smollm2-135m_cpu_bfloat16_headline.json")
    speed("mask-last-logits-bf16-amx", "speed_smollm2-135m_cpu_bfloat16_mask_last-logits.json")
    speed("mask-ab-bf16-amx", "speed_smollm2-135m_cpu_bfloat16_mask_before.json",
          "speed_smollm2-135m_cpu_bfloat16_mask_after.json")
    speed("targets-bf16-avx512", *(f"speed_{m}_cpu_bfloat16_avx512_targets_run{i}.json"
                                   for m in ("smollm2-135m", "llama-2b-shaped") for i in (1, 2, 3)))
    speed("batch1-reps40-bf16-avx512", "speed_smollm2-135m_cpu_bfloat16_avx512_batch1_reps40.json")
    speed("cost-breakeven-bf16-avx512", "speed_smollm2-135m_cpu_bfloat16_avx512_breakeven.json")
    speed("headviews-bf16-amx", "speed_smollm2-135m_cpu_bfloat16_headviews.json",
          "speed_smollm2-135m_cpu_bfloat16_headviews_run2.json", "speed_llama-2b-shaped_cpu_bfloat16_headviews.json",
          "speed_llama-2b-shaped_cpu_bfloat16_headviews_run2.json")
    speed("dynamic-static", "speed_smollm2-135m_dynamic_vs_static_cpu.json")
    stream("stream", "stream_smollm2-135m_b16_l1024_cpu.json", "stream_smollm2-135m_cpu.json")
    generate("generate-smollm2", "generate_smollm2-135m_cpu.json")
    generate("generate-llama", "generate_llama-2b-shaped_cpu.json")
    generate("generate-llama-24l", "generate_llama-2b-shaped-24l_cpu.json")
    generate("generate-bfloat16", "generate_smollm2-135m_cpu_bfloat16.json")
    generate("generate-bfloat16-avx512", "generate_smollm2-135m_cpu_bfloat16_avx512.json")
    generate("continuation", "continuation_smollm2-135m.json")
    vllm("vllm", "vllm_serve_smollm2-135m_cpu.json")
    _run("shards", "--from-json", RES / "shards_smollm2_brown-a.json")
    archs = importlib.import_module("archs")
    archs.DOC = tmp / "archs.md"  # docs/archs.md is archs.py's own (python bench/archs.py --from-json ... --readme)
    _run("archs", "--from-json", RES / "archs_tiny_configs.json", "--readme")
    readme.replace_block("headline", headline(), readme.README)
    vllm("vllm", "vllm_serve_smollm2-135m_cpu.json", "--medians", doc=readme.README)
    return list(readme.WRITTEN)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--into", type=Path, help="fill copies of README.md and docs/results.md made in DIR")
    p.add_argument("--check", action="store_true", help="fill a temporary copy and compare it with the files")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        into = Path(tmp) / "copy" if args.check else args.into
        if into:
            (into / "docs").mkdir(parents=True, exist_ok=True)
            shutil.copy(readme.README, into / "README.md")
            shutil.copy(readme.RESULTS, into / "docs" / "results.md")
            readme.README, readme.RESULTS = into / "README.md", into / "docs" / "results.md"
        written = fill(Path(tmp))
        for doc in (readme.RESULTS, readme.README):
            missing = set(readme.blocks(doc)) - set(written)
            if missing:
                raise SystemExit(f"{doc}: no bench fills block(s) {', '.join(sorted(missing))}")
        if args.check:
            diff = [line for name in ("docs/results.md", "README.md") for line in difflib.unified_diff(
                (ROOT / name).read_text().splitlines(True), (into / name).read_text().splitlines(True),
                name, f"{name} (regenerated)")]
            sys.stdout.writelines(diff)
            if diff:
                raise SystemExit(1)
    print(f"filled {len(written)} blocks of {readme.RESULTS} and {readme.README}")


if __name__ == "__main__":
    main()
