"""Weight layouts the pass chooses, and why (torch.utils.benchmark medians).

Why the decode reads its compact weights transposed: the time of one matmul of a few token rows
by a weight stored as nn.Linear stores it, (out, in), against the same weight stored (in, out)
contiguous, for the compact projection shapes of a model at a ratio.

    python bench/layout.py                        # SmolLM2-135M's shapes at 0.4, rows 1, 8, 16
    python bench/layout.py --hidden 2048 --mlp 5632 --rows 1,8

--gathers: why the selection gathers as it does (Inductor-compiled, the model's dtype): a final
projection's kept columns gathered one by one, against whole heads through a view (attention),
and against rows of a transposed copy (MLP: PPConfig.final_layout).

    python bench/layout.py --gathers --hidden 2048 --mlp 5632 --heads 16 --dtype bfloat16
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
    p.add_argument("--gathers", action="store_true", help="time the selection's weight gathers instead")
    p.add_argument("--heads", type=int, default=9)
    args = p.parse_args()
    dtype = getattr(torch, args.dtype)
    if args.gathers:
        return gathers(args.hidden, args.mlp, args.heads, args.ratio, dtype)
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


def gathers(hidden: int, mlp: int, heads: int, ratio: float, dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(0)
    head_dim = hidden // heads
    kept_heads = torch.randperm(heads, generator=gen)[:heads - int(ratio * heads)].sort().values
    kept_chan = torch.randperm(mlp, generator=gen)[:mlp - int(ratio * mlp)].sort().values
    o = torch.randn(hidden, hidden, generator=gen).to(dtype)  # (d, H * hd)
    down = torch.randn(hidden, mlp, generator=gen).to(dtype)  # (d, C)
    down_t = down.t().contiguous()  # (C, d): the transposed copy

    def columns(w, kept):
        return w.index_select(1, kept)

    def heads_view(w, kept):
        return w.unflatten(1, (-1, head_dim)).index_select(1, kept).flatten(1, 2)

    def copy_rows(w_t, kept):
        return w_t.index_select(0, kept).t()

    chan = (kept_heads.unsqueeze(-1) * head_dim + torch.arange(head_dim)).flatten()
    o_kept, down_kept = o[:, chan], down[:, kept_chan]  # what every way must give
    cases = [("o_proj kept heads", "column by column", torch.compile(columns), o, chan, o_kept),
             ("o_proj kept heads", "whole heads (view)", torch.compile(heads_view), o, kept_heads, o_kept),
             ("down kept channels", "column by column", torch.compile(columns), down, kept_chan, down_kept),
             ("down kept channels", "rows of the transposed copy", torch.compile(copy_rows), down_t, kept_chan,
              down_kept)]
    rows = []
    for what, how, fn, w, kept, expect in cases:
        torch.testing.assert_close(fn(w, kept), expect, rtol=0, atol=0)
        rows.append([what, how, f"{tuple(w.shape)}", _time(lambda: fn(w, kept)) * 1e3])
    print(tabulate(rows, headers=["weight", "gathered", "stored", "ms"], floatfmt=".3g", tablefmt="github"))
    print(f"\n{dtype}, hidden {hidden}, MLP {mlp}, {heads} heads, ratio {ratio}, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}, Inductor, medians of blocked autorange")


if __name__ == "__main__":
    main()
