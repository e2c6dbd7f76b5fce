"""ppcompile: Probe Pruning (ICLR 2025) as a torch.compile pass for Hugging Face causal LMs."""
from .api import calibrate, compile
from .backend import Session
from .calibration import Calibration
from .config import PPConfig
from .explain import Explanation, explain
from .runtime import Runtime

__version__ = "0.1.0"
__all__ = ["compile", "calibrate", "explain", "Calibration", "Explanation", "PPConfig", "Runtime", "Session"]


def _register_backend() -> None:
    # `torch.compile(model, backend="ppcompile")` also works without the entry point installed.
    from torch._dynamo import list_backends, register_backend

    from .backend import ppcompile_backend

    if "ppcompile" not in list_backends(exclude_tags=()):
        register_backend(name="ppcompile")(ppcompile_backend)


_register_backend()
