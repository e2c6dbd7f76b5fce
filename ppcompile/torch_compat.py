"""What differs between the torch releases ppcompile runs on: 2.13 (constraints.txt, CI) and the
2.11 of the GPU machines' image, where the CUDA route is checked (tests/test_cuda.py)."""
import inspect

import torch

# torch >= 2.13: a compiled module's recompiles count against a limit of its own
_ISOLATES = "isolate_recompiles" in inspect.signature(torch.compile).parameters


def compile_isolated(model, **kwargs):
    """torch.compile, with this model's recompiles counted apart from other compiled copies of its
    class where torch can (2.13+); older torch counts them per code object, shared by the copies."""
    if _ISOLATES:
        kwargs["isolate_recompiles"] = True
    return torch.compile(model, **kwargs)


# torch < 2.13: FakeTensorProp over symbolic sizes needs the python dispatcher for composite ops
# (linear -> matmul raised "Cannot call numel() on tensor with symbolic sizes" on 2.11); on 2.13
# it is not needed, and turning it on there slowed the pass's value refresh several times
FAKE_PROP_NEEDS_PYTHON_DISPATCHER = torch.__version__ < (2, 13)
