"""Why the decode reads its compact weights transposed: the time of one matmul of a few token rows
by a weight stored as nn.Linear stores it, (out, in), against the same weight stored (in, out)
contiguous, for the compact projection shapes of a model at a ratio (torch.utils.benchmark medians).

    python bench/layout.py                        # SmolLM2-135M's shapes at 0.4, rows 1, 8, 16
    python bench/layout.py --hidden 2048 --mlp 5632 --rows 1,8
"""
from __future__ import annotations

import argparse

import torch
from tabulate import tabulate
from torch.utils.benchmark import Timer


def _time(fn) -> float:
    """Median seconds of one call (torch's blocked autorange: blocks of calls, at least 0.2 s)."""
    timer = Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())  # its default is 1
    return timer.blocked_autorange(min_run_time=0.2).median


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden", type=int, default=576)
    p.add_argument("--mlp", type=int, default=1536)
    p.add_argument("--ratio", type=float, default=0.4)
    p.add_argument("--rows", default="1,8,16")
    p.add_argument("--dtype", default="float32")
    args = p.parse_args()
    dtype = getattr(torch, args.dtype)
    kept_h, kept_c = round(args.hidden * (1 - args.ratio)), round(args.mlp * (1 - args.ratio))
    shapes = {"q (kept heads)": (kept_h, args.hidden), "o (kept heads)": (args.hidden, kept_h),
              "gate/up (kept channels)": (kept_c, args.hidden), "down (kept channels)": (args.hidden, kept_c)}
    gen = torch.Generator().manual_seed(0)
    rows = []
    for m in (int(r) for r in args.rows.split(",")):
        for name, (out, inp) in shapes.items():
            x = torch.randn(m, inp, generator=gen).to(dtype)
            w = torch.randn(out, inp, generator=gen).to(dtype)  # (out, in): nn.Linear's layout
            w_t = w.t().contiguous()  # (in, out): what the prefill stores
            linear = _time(lambda: torch.mm(x, w.t()))
            stored = _time(lambda: torch.mm(x, w_t))
            rows.append([m, name, f"{out}x{inp}", linear * 1e6, stored * 1e6, linear / stored])
    print(tabulate(rows, headers=["rows", "projection", "weight (out x in)", "(out, in) us", "(in, out) us",
                                  "speedup"], floatfmt=".3g", tablefmt="github"))
    print(f"\n{args.dtype}, {torch.get_num_threads()} threads, torch {torch.__version__}, medians of blocked autorange")


if __name__ == "__main__":
    main()
