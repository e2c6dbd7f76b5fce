"""Quality benchmark: dense, pp, full-batch, wanda-sp and flap on the issue's protocol, as PPL
multiples of dense next to the reference implementation's; writes bench/results/ and the README.

    python bench/quality.py                 # the protocol: SmolLM2-135M, Brown a / fgh, 512 x 8 x 4
    python bench/quality.py --no-readme     # only print and write the JSON
"""
from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

from tabulate import tabulate

from ppcompile.cli import _run_eval

ROOT = Path(__file__).resolve().parent.parent
METHODS = ["dense", "full-batch", "pp", "wanda-sp", "flap"]
# PPL / dense PPL of an independent implementation of ALGORITHM.md on this protocol (issue 3)
REFERENCE = {0.2: {"full-batch": 1.35, "pp": 1.46, "wanda-sp": 1.44, "flap": 1.62},
             0.4: {"full-batch": 2.61, "pp": 2.95, "wanda-sp": 3.04, "flap": 3.49}}


def table(rows: list[dict]) -> str:
    dense = next(r for r in rows if r["method"] == "dense")
    out = []
    for r in rows:
        multiple = r["ppl"] / dense["ppl"]
        ref = REFERENCE.get(r["ratio"], {}).get(r["method"])
        out.append([r["method"], r["ratio"] if r["method"] != "dense" else "-", f"{r['ppl']:.2f}",
                    f"{multiple:.2f}", f"{ref:.2f}" if ref else "-",
                    f"{100 * (multiple / ref - 1):+.1f}%" if ref else "-",
                    f"{r['kl']:.3f}", f"{r['top1']:.3f}", f"{r['seconds_per_batch']:.2f}"])
    return tabulate(out, headers=["method", "ratio", "ppl", "x dense", "reference x dense", "vs reference",
                                  "KL to dense", "top-1 agree", "s / batch"], tablefmt="github")


def context(rows: list[dict]) -> str:
    r = rows[0]
    cal = r["calibration"]
    return (f"{r['model']} (fp32), evaluation text {r['text']} (first {r['batches'] * r['batch_size']} "
            f"non-overlapping {r['seq_len']}-token windows, batch {r['batch_size']}, first batch run once "
            f"as warm-up), calibration {cal['windows']} seeded-random {cal['seq_len']}-token windows of "
            f"{cal['text']} (seed {cal['seed']}, {r['calibration_seconds']:.0f} s); dense runs eager (the model "
            f"as loaded), the pruned methods with backend {r['backend']}; torch {r['torch']}, {r['device']}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--data", default="brown:a")
    p.add_argument("--calibration", default="brown:fgh")
    p.add_argument("--calibration-windows", type=int, default=64)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--batches", type=int, default=4)
    p.add_argument("--ratios", default="0.2,0.4")
    p.add_argument("--backend", choices=["inductor", "eager"], default="inductor")
    p.add_argument("--out", type=Path, default=ROOT / "bench/results/quality_smollm2_brown-a.json")
    p.add_argument("--from-json", type=Path, help="only format an earlier run's JSON")
    p.add_argument("--no-readme", action="store_true")
    args = p.parse_args()
    if args.from_json:
        rows = json.loads(args.from_json.read_text())
    else:
        rows = _run_eval(args.model, args.data, args.seq_len, args.batch_size, args.batches, METHODS,
                         [float(r) for r in args.ratios.split(",")], True, calibration=args.calibration,
                         calibration_windows=args.calibration_windows, backend=args.backend)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(rows, indent=2) + "\n")
    text = f"{table(rows)}\n\n{context(rows)}."
    print(text)
    if not args.no_readme:
        readme = ROOT / "README.md"
        block = f"<!-- quality:start -->\n{text}\n<!-- quality:end -->"
        new = re.sub(r"<!-- quality:start -->.*?<!-- quality:end -->", lambda m: block,
                     readme.read_text(), flags=re.S)
        if "<!-- quality:start -->" not in new:
            raise SystemExit("README.md has no <!-- quality:start --> ... <!-- quality:end --> block")
        readme.write_text(new)


if __name__ == "__main__":
    main()
