import importlib
import os
import sys
from pathlib import Path

import pytest
import torch

# The tiny models of the tests would pay for pruning at no size: the cost rule (passes/cost.py)
# would leave every block dense. The tests of the pass prune at every size (spawned processes
# inherit it); tests/test_cost.py sets gather_cost itself.
os.environ["PPCOMPILE_GATHER_COST"] = "0"

if os.environ.get("PYTEST_XDIST_WORKER"):  # one worker per core: a second torch thread would share it
    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def bench_module():
    """Import a script of bench/ by name: its scripts import each other by name, as they do when run,
    so bench/ is on sys.path only while one is imported."""
    bench = str(Path(__file__).resolve().parents[1] / "bench")

    def load(name: str):
        sys.path.insert(0, bench)
        try:
            return importlib.import_module(name)
        finally:
            sys.path.remove(bench)
    return load


@pytest.fixture(autouse=True)
def fresh_dynamo():
    # Every test compiles models of the same classes: without a reset, Dynamo's per-code-object
    # recompile limit is reached and it silently runs the model uncompiled.
    torch._dynamo.reset()
    yield
