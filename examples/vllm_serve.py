"""Probe Pruning inside vLLM (its CPU build): the packaged SmolLM2-135M pruned at 0.4, offline with
LLM(...) or served by vLLM's OpenAI-compatible server and asked one question over HTTP.

    python examples/vllm_serve.py            # LLM(...): two prompts, greedy, and what each step ran
    python examples/vllm_serve.py --serve    # the server on 127.0.0.1, one /v1/completions request

Needs vLLM's CPU build (`make vllm-venv`, then run with .venv-vllm/bin/python). The server
command it runs (ppcompile/vllm_server.py) is the one the README gives ("Serving with vLLM").
"""
import argparse
import json
import subprocess
import urllib.request

from ppcompile.models import checkpoint_folder
from ppcompile.vllm_plugin import engine_args
from ppcompile.vllm_server import server_command, server_env, wait_ready

PROMPTS = ["The capital of France is", "def fibonacci(n):"]


def offline(folder: str, ratio: float) -> None:
    from vllm import LLM, SamplingParams
    llm = LLM(folder, dtype="bfloat16", max_model_len=512, max_num_seqs=4, **engine_args(ratio=ratio))
    for out in llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=24), use_tqdm=False):
        print(f"{out.prompt!r} -> {out.outputs[0].text!r}")


def serve(folder: str, ratio: float, port: int) -> None:
    server = subprocess.Popen(server_command(folder, port), env=server_env({"ratio": ratio}))
    try:
        wait_ready(port, server)
        body = json.dumps({"model": "smollm2", "prompt": PROMPTS[0], "max_tokens": 24, "temperature": 0}).encode()
        request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", body,
                                         {"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=300) as r:
            answer = json.load(r)
        print(f"{PROMPTS[0]!r} -> {answer['choices'][0]['text']!r} ({answer['usage']})")
    finally:
        server.terminate()
        server.wait(timeout=60)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--serve", action="store_true", help="run vLLM's OpenAI server and send it one request")
    ap.add_argument("--ratio", type=float, default=0.4)
    ap.add_argument("--port", type=int, default=8765)
    args = ap.parse_args()
    folder = str(checkpoint_folder("smollm2-135m"))  # converted once from the packaged GGUF
    serve(folder, args.ratio, args.port) if args.serve else offline(folder, args.ratio)


if __name__ == "__main__":
    main()
