"""Serving throughput and latency: dense vLLM vs Probe Pruning inside vLLM, same machine, same run.

For each method (in turn, rounds interleaved) it starts vLLM's OpenAI server on 127.0.0.1 (the
command of ppcompile/vllm_server.py), sends one warm-up request, then a bounded stream of requests:
prompts cut from the Brown Corpus at mixed lengths, a fixed number of output tokens each
(ignore_eos), greedy, `--concurrency` in flight, streamed. Per request: time to first token
(TTFT) and the mean gap between later tokens (ITL); per stream: output tokens per second.
Methods: dense (vLLM as it ships), dense F.linear (the same with the plugin's plain MLP linears:
what they cost apart from pruning), pp (through ppcompile). pp's rows also hold what its steps ran:
the server log's "[ppcompile] vLLM" lines (one at 1, 2, 4, ... steps); a step run unpruned fails
the run.

    .venv-vllm/bin/python bench/vllm_serve.py [--requests 32 --concurrency 4 --max-tokens 64 --rounds 2]

Writes bench/results/vllm_serve_smollm2-135m_cpu.json. Run it alone: a second process on these
cores changes every figure.
"""
from __future__ import annotations

import argparse
import http.client
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

from ppcompile import data
from ppcompile.models import checkpoint_folder
from ppcompile.vllm_server import server_command, server_env, wait_ready
from protocol import cpu_model  # bench/ is the script's folder: on sys.path

OUT = Path(__file__).resolve().parent / "results" / "vllm_serve_smollm2-135m_cpu.json"
PROMPT_WORDS = (24, 48, 96, 192)  # mixed prompt lengths, in words (about 1.3 tokens each)
PLAIN = ("dense", "dense F.linear")  # vLLM's own compile (see the docstring)
ISA_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16")  # what decides a CPU's bf16 matmul kernels
METHODS = (*PLAIN, "pp")


def prompts(n: int, seed_text: str = "brown:a") -> list[str]:
    words = " ".join(text for _, text in data.load_documents(seed_text)).split()
    out, at = [], 0
    for i in range(n):
        k = PROMPT_WORDS[i % len(PROMPT_WORDS)]
        out.append(" ".join(words[at:at + k]))
        at += k
    return out


def one_request(port: int, prompt: str, max_tokens: int) -> dict:
    """Stream one completion: the arrival time of every chunk of text."""
    body = json.dumps({"model": "smollm2", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
                       "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}})
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    start = time.perf_counter()
    conn.request("POST", "/v1/completions", body, {"Content-Type": "application/json"})
    response = conn.getresponse()
    if response.status != 200:
        raise RuntimeError(f"HTTP {response.status}: {response.read()[:500]!r}")
    arrivals, tokens = [], None
    for raw in response:
        line = raw.decode().strip()
        if not line.startswith("data: ") or line == "data: [DONE]":
            continue
        chunk = json.loads(line[6:])
        if chunk.get("usage"):
            tokens = chunk["usage"]["completion_tokens"]
        if chunk.get("choices") and chunk["choices"][0].get("text"):
            arrivals.append(time.perf_counter() - start)
    conn.close()
    gaps = [b - a for a, b in zip(arrivals, arrivals[1:])]
    return {"ttft_s": arrivals[0], "itl_s": statistics.mean(gaps) if gaps else None, "total_s": arrivals[-1],
            "tokens": tokens}


def stream(port: int, batch: list[str], max_tokens: int, concurrency: int) -> dict:
    """`batch` with at most `concurrency` requests in flight."""
    results: list[dict] = [None] * len(batch)
    nxt = iter(range(len(batch)))
    lock = threading.Lock()

    def worker():
        while True:
            with lock:
                i = next(nxt, None)
            if i is None:
                return
            results[i] = one_request(port, batch[i], max_tokens)

    start = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    tokens = sum(r["tokens"] for r in results)
    return {"wall_s": wall, "tokens": tokens, "tokens_per_s": tokens / wall,
            "ttft_s": [r["ttft_s"] for r in results], "itl_s": [r["itl_s"] for r in results if r["itl_s"]]}


def run_server(method: str, ratio: float, args, batch: list[str]) -> dict:
    # dense F.linear: vLLM's own compile, with the plugin on (its plain MLP linears) but not its backend
    command = server_command(str(checkpoint_folder("smollm2-135m")), args.port, pruned=method not in PLAIN)
    env = server_env(None if method == "dense" else {"ratio": ratio, **json.loads(args.options)})
    log_path = Path(args.log_dir) / f"{method.replace(' ', '_')}.log"
    log = open(log_path, "a")
    offset = log.tell()
    start = time.perf_counter()
    server = subprocess.Popen(command + ["--max-num-seqs", str(args.concurrency)], env=env, stdout=log,
                              stderr=subprocess.STDOUT)
    try:
        wait_ready(args.port, server)
        ready = time.perf_counter() - start
        one_request(args.port, batch[0], args.max_tokens)  # warm-up: the first step's allocations
        measured = stream(args.port, batch, args.max_tokens, args.concurrency)
    finally:
        server.terminate()
        server.wait(timeout=120)
        log.close()
    with open(log_path) as f:
        f.seek(offset)
        lines = f.read().splitlines()
    steps = [x[x.index("[ppcompile] vLLM steps"):] for x in lines if "[ppcompile] vLLM steps" in x]
    unpruned = [x for x in lines if "ran unpruned" in x or "without ppcompile's backend" in x]
    if method not in PLAIN and (not steps or unpruned):
        raise RuntimeError(f"{method}: steps ran unpruned or uncounted, see {log_path}")
    return {"method": method, "ratio": 0.0 if method in PLAIN else ratio, "startup_s": ready,
            "ppcompile": steps, **measured}


def summary(row: dict) -> dict:
    q = lambda xs, p: statistics.quantiles(xs, n=10)[p] if len(xs) >= 2 else xs[0]  # noqa: E731
    return {"method": row["method"], "tokens/s": row["tokens_per_s"],
            "TTFT median ms": 1000 * statistics.median(row["ttft_s"]), "TTFT p90 ms": 1000 * q(row["ttft_s"], 8),
            "ITL median ms": 1000 * statistics.median(row["itl_s"]), "ITL p90 ms": 1000 * q(row["itl_s"], 8),
            "startup s": row["startup_s"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--concurrency", type=int, default=4)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--ratio", type=float, default=0.4)
    ap.add_argument("--options", default="{}", help="more ppcompile options, as JSON")
    ap.add_argument("--rounds", type=int, default=1, help="each method's server, interleaved, this many times")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--port", type=int, default=8766)
    ap.add_argument("--log-dir", default="out/vllm_serve")
    ap.add_argument("--out", default=str(OUT))
    ap.add_argument("--from-json", type=Path, help="print the table of an earlier run's JSON (no vLLM needed)")
    ap.add_argument("--medians", action="store_true", help="with --from-json: the medians over rounds alone")
    args = ap.parse_args()
    if args.from_json:
        print(report(json.loads(args.from_json.read_text()), args.from_json, args.medians))
        return
    Path(args.log_dir).mkdir(parents=True, exist_ok=True)
    batch = prompts(args.requests)
    rows = []
    for r in range(args.rounds):
        for method in args.methods.split(","):
            row = run_server(method, args.ratio, args, batch)
            rows.append({**row, "round": r})
            print(json.dumps(summary(row)), file=sys.stderr, flush=True)
    import platform

    import torch
    import vllm
    flags = set(Path("/proc/cpuinfo").read_text().split())
    isa = ", ".join(f if f in flags else f"no {f}" for f in ISA_FLAGS)
    meta = {"machine": cpu_model(), "isa": isa, "cores": os.cpu_count(), "python": platform.python_version(),
            "torch": torch.__version__, "vllm": vllm.__version__, "model": "smollm2-135m", "dtype": "bfloat16",
            "text": "brown:a", "prompt_words": PROMPT_WORDS, "requests": args.requests,
            "concurrency": args.concurrency, "max_tokens": args.max_tokens, "options": json.loads(args.options)}
    result = {"meta": meta, "rows": rows}
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(report(result, Path(args.out)))


def report(result: dict, path: Path, medians: bool = False) -> str:
    """The table (a row per server run, then dense's and pp's medians over rounds; `medians`:
    those alone) and what it ran on."""
    from tabulate import tabulate
    rows, m = result["rows"], result["meta"]
    runs = [{"round": r["round"], **summary(r)} for r in rows]
    table = [] if medians else list(runs)
    for method in dict.fromkeys(t["method"] for t in runs):
        mine = [t for t in runs if t["method"] == method]
        table.append({"round": f"median of {len(mine)}", "method": method,
                      **{k: statistics.median(t[k] for t in mine) for k in mine[0] if k not in ("round", "method")}})
    pp = next(r for r in rows if r["method"] == "pp")
    steps = pp["ppcompile"][-1] if pp["ppcompile"] else "none"
    try:
        shown = path.resolve().relative_to(Path(__file__).resolve().parents[1])
    except ValueError:
        shown = path
    return (tabulate(table, headers="keys", floatfmt=".1f", tablefmt="github") +
            f"\n\n{m['requests']} requests per server, {m['concurrency']} in flight, prompts of "
            f"{'/'.join(map(str, m['prompt_words']))} words of {m['text']} in turn, {m['max_tokens']} output tokens "
            f"each (ignore_eos), greedy, streamed over HTTP to vLLM's OpenAI server on 127.0.0.1; one warm-up "
            f"request first. TTFT: time to first token; ITL: mean gap between a request's later tokens (median and "
            f"90th percentile over requests). dense: vLLM {m['vllm']} as it ships (its CPU GEMMs); dense F.linear: the "
            f"same with the plugin's plain F.linear MLPs and no pruning; pp: the plugin at "
            f"ratio {pp['ratio']} (MLPs only, attention dense){', options ' + json.dumps(m['options']) if m['options'] else ''}, "
            f"whose last step count read \"{steps.removeprefix('[ppcompile] vLLM steps: ')}\". Servers started "
            f"in turn ({', '.join(dict.fromkeys(r['method'] for r in rows))}, then again), one at a time. {m['model']} ({m['dtype']}); {m['machine']} "
            f"({m.get('isa', 'ISA not recorded')}), "
            f"{m['cores']} cores, torch {m['torch']}; from {shown}. Printed by `python bench/vllm_serve.py "
            f"--from-json {shown}{' --medians' if medians else ''}`")


if __name__ == "__main__":
    main()
