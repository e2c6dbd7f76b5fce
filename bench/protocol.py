"""The quality protocol's arguments, shared by the benches that evaluate perplexity: the text,
the calibration windows, the window length and the batches."""
from __future__ import annotations

import argparse


def add_protocol_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", default="brown:a")
    p.add_argument("--calibration", default="brown:fgh")
    p.add_argument("--calibration-windows", type=int, default=64)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--batches", type=int, default=4)
