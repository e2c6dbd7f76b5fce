import pytest
import torch


@pytest.fixture(autouse=True)
def fresh_dynamo():
    # Every test compiles models of the same classes: without a reset, Dynamo's per-code-object
    # recompile limit is reached and it silently runs the model uncompiled.
    torch._dynamo.reset()
    yield
