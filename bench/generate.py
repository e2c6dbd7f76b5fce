"""Generation benchmark: dense vs pp vs griffin vs flap vs wanda-sp, every one compiled by the same
route (pp.compile, Inductor, Hugging Face's generate on a static KV cache; dense is policy "dense":
the same loop and cache, the graph unchanged), interleaved in one process. "pp@0" is pp at ratio 0:
the pass's decode path with nothing pruned (its attention reads the cache in place, its weights
are stored transposed), so that what pruning gains is read apart from what the rewrite gains.

    python bench/generate.py                                  # LLaMA-2B-shaped, batch 1 and 8, prompt 128 and 512
    python bench/generate.py --model smollm2-135m
    python bench/generate.py --model llama-2b-shaped --layers 24  # deeper, same width
    python bench/generate.py --quality                        # SmolLM2 on real text (see below)

--dtype: speed runs by default in the dtype a user who wants speed runs (`auto`: bfloat16 on CUDA
and on a CPU with a bf16 matrix unit, else float32), quality in float32.

Speed, per shape (batch x prompt) and method: prefill seconds (the call until the first new token),
decode tokens/s over the other new tokens (a streamer stamps each token), both medians over --reps
rounds after a warm-up generation that compiles; dense's and pp's plain forward of the prompt
(what a prefill is compared with: it adds generate's own work and, for pp, storing the selection);
the peak memory of a generation; the weight bytes
a decode step's matmuls read (flops.weight_bytes of the decode graph) and pp's **byte limit**:
dense decode time x pp's bytes / dense's bytes, the time a decode step would take if it cost only
its weight reads. Token ids are random and generation runs --new tokens whatever it samples.

Quality (--quality): SmolLM2 on Brown genre a, calibration on f-h (as the quality bench),
512-token windows: the first 256 tokens are the prompt that selects (a prefill into an empty
static cache), the last 256 are scored teacher-forced with that selection (one decode call on the
cache): continuation perplexity per method, the full-batch oracle selecting from the whole window;
and greedy agreement with dense over 64 new tokens from the same prompts.
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from pathlib import Path

import torch
from tabulate import tabulate

import ppcompile as pp
from ppcompile.flops import weight_bytes
from ppcompile.generation import timed_generate
from ppcompile.guard import assert_pruned
from ppcompile.models import KNOWN_MODELS, RANDOM_ARCHS, dtype_name, dtype_suffix, load_model, parse_dtype
from ppcompile.workloads import device_name, windows_and_calibration
from protocol import CALIBRATED, add_protocol_args, label, parse_label, provenance
from speed import PeakMemory, _model, _shapes  # bench/ is the script's folder: on sys.path

ROOT = Path(__file__).resolve().parent.parent
# method labels (protocol.label): "pp@0" is pp at ratio 0 (the pass's decode path with nothing
# pruned: what the rewrite gains besides pruning); a label without a ratio runs at the bench's --ratio
METHODS = [label("dense"), label("pp", 0.0), label("pp"), label("griffin"), label("flap"), label("wanda-sp")]
QUALITY_METHODS = [label("full-batch"), label("pp"), label("griffin"), label("flap"), label("wanda-sp")]
FORWARD = {"dense", "pp"}  # also timed on a plain forward of the prompt (prefill = forward + generate's own work)


def _compiled(model, method: str, ratio: float, cal, cache_len: int):
    policy, ratio, options = parse_label(method, ratio)
    return pp.compile(model, ratio, policy=policy, calibration=cal if policy in CALIBRATED else None,
                      cache_bucket=cache_len, **options)


def _generate(fn, ids, new: int, warm: bool = False):
    return timed_generate(fn, ids, new=new, warm=warm, pad_token_id=0)


def run(model, vocab: int, shapes: list[tuple[int, int]], new: int, ratio: float, methods: list[str], reps: int,
        device: torch.device) -> list[dict]:
    """Every method compiled once (one cache length for every shape, so that the shapes share
    graphs), then per shape: a warm-up generation each, and `reps` rounds interleaved."""
    gen = torch.Generator().manual_seed(0)
    cal = pp.calibrate(model, [torch.randint(0, vocab, (2, 128), generator=gen).to(device) for _ in range(2)]) \
        if CALIBRATED & {parse_label(m)[0] for m in methods} else None
    torch._dynamo.reset()
    cache_len = 128 * math.ceil(max(p + new for _, p in shapes) / 128)
    fns = {m: _compiled(model, m, ratio, cal, cache_len) for m in methods}
    out = []
    for batch, prompt in shapes:
        ids = torch.randint(0, vocab, (batch, prompt), generator=gen).to(device)
        rows = {m: {"prefill": [], "decode": [], "forward": []} for m in methods}
        with torch.no_grad():
            for m, fn in fns.items():  # compiles the prefill and the decode graph (and pp's forward)
                start = time.perf_counter()
                _generate(fn, ids, new)
                rows[m]["first_s"] = time.perf_counter() - start
                if m in FORWARD:
                    fn(input_ids=ids, use_cache=False)
            for rep in range(reps):
                for m, fn in fns.items():
                    with PeakMemory(device) as mem:
                        _, prefill, step = _generate(fn, ids, new, warm=True)
                    rows[m]["prefill"].append(prefill)
                    rows[m]["decode"].append(step)
                    if rep == 0:
                        rows[m]["peak_mib"] = mem.mib
                    if m in FORWARD:  # the plain forward of the prompt: what the prefill is compared with
                        start = time.perf_counter()
                        fn(input_ids=ids, use_cache=False)
                        rows[m]["forward"].append(time.perf_counter() - start)
        out += _rows(fns, rows, batch, prompt, new, ratio, cache_len)
    return out


def _rows(fns, rows, batch, prompt, new, ratio, cache_len) -> list[dict]:
    out = []
    for m, fn in fns.items():
        session = fn.pp
        assert_pruned(fn, method=f"{m} (generate, batch {batch} x prompt {prompt})")  # every prefill and decode step
        decode = next(r for r in reversed(session.passes) if r.phase == "decode")
        step = statistics.median(rows[m]["decode"])
        out.append({"method": m, "batch": batch, "prompt": prompt, "new": new, "cache_len": cache_len,
                    "ratio": parse_label(m, ratio)[1],
                    "prefill_s": statistics.median(rows[m]["prefill"]),
                    "forward_s": statistics.median(rows[m]["forward"]) if rows[m]["forward"] else None,
                    "decode_tok_s": batch / step, "decode_step_s": step,
                    "decode_spread": [min(rows[m]["decode"]), max(rows[m]["decode"])],
                    "weight_bytes": weight_bytes(decode.gm), "first_call_s": rows[m]["first_s"],
                    "peak_mib": rows[m]["peak_mib"], "provenance": provenance(fn, dtype=fn.dtype)})
    dense = next((r for r in out if r["method"] == "dense"), None)
    for r in out:
        if dense:
            r["decode_vs_dense"] = r["decode_step_s"] / dense["decode_step_s"]
            r["prefill_vs_dense"] = r["prefill_s"] / dense["prefill_s"]
            r["bytes_ratio"] = r["weight_bytes"] / dense["weight_bytes"]
            r["vs_byte_limit"] = r["decode_step_s"] / (dense["decode_step_s"] * r["bytes_ratio"])
    flap = next((r for r in out if r["method"] == "flap"), None)
    if dense and flap and flap["decode_vs_dense"] < 1:
        for r in out:
            r["share_of_flap_cut"] = (1 - r["decode_vs_dense"]) / (1 - flap["decode_vs_dense"])
    return out


def table(rows: list[dict]) -> str:
    cols = ["model", "dtype", "batch", "prompt", "new", "method", "ratio", "prefill_s", "prefill_vs_dense", "forward_s",
            "decode_tok_s",
            "decode_vs_dense", "bytes_ratio", "vs_byte_limit", "share_of_flap_cut", "peak_mib"]
    return tabulate([[r.get(c) for c in cols] for r in rows], headers=cols, floatfmt=".3g", tablefmt="github")


# ---- quality ----
def continuation_quality(args, dtype: torch.dtype) -> list[dict]:
    from ppcompile import data
    from ppcompile.evaluate import continuation_nll
    model, tokenizer = load_model(args.model, dtype=dtype)
    half, rows = args.seq_len // 2, []
    for seed in [int(s) for s in args.seeds.split(",")]:
        windows, cal, _ = windows_and_calibration(model, tokenizer, args.data, args.seq_len,
                                                  args.batch_size * args.batches, args.batch_size,
                                                  args.calibration, args.calibration_windows, seed, False)
        batches = list(data.iter_batches(windows, args.batch_size))
        methods = [m for m in (args.methods or ",".join(QUALITY_METHODS)).split(",") if m != "dense"]
        runs = [("dense", 0.0)] + [(m, r) for r in args.ratios for m in methods]
        prompts = batches[0][:, :half]  # greedy agreement: the first batch's prompts, against dense (run first)
        for method, ratio in runs:
            policy, ratio, options = parse_label(method, ratio)
            torch._dynamo.reset()
            fn = model if policy == "dense" else pp.compile(  # values equal Inductor's (tests): run eager
                model, ratio, policy=policy, calibration=cal if policy in CALIBRATED else None, backend="eager",
                **options)
            nll = tokens = 0
            with torch.no_grad():
                for b in batches:
                    n, t = continuation_nll(fn, b, half, whole=policy == "full-batch")
                    nll, tokens = nll + n, tokens + t
            greedy = _greedy_tokens(fn, prompts, args.greedy)
            if policy != "dense":  # every scored call and greedy step ran pruned
                assert_pruned(fn, method=f"{label(policy, ratio, **options)} (continuation quality)")
            if policy == "dense":
                dense_greedy = greedy
            agree = float((greedy == dense_greedy).float().mean())  # position by position
            rows.append({"method": method, "ratio": ratio, "seed": seed, "ppl": math.exp(nll / tokens),
                         "tokens": tokens, "greedy_agreement": agree,
                         "provenance": provenance(None if policy == "dense" else fn, dtype=dtype)})
            print(json.dumps(rows[-1]), flush=True)
    return rows


def _greedy_tokens(fn, prompts, new: int) -> torch.Tensor:
    with torch.no_grad():
        return _generate(fn, prompts, new)[0][:, -new:]


def quality_table(rows: list[dict]) -> str:
    dense = {r["seed"]: r["ppl"] for r in rows if r["method"] == "dense"}
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["method"], r["ratio"] if r["method"] != "dense" else "-"), []).append(r)
    body = []
    for (m, ratio), rs in groups.items():
        mult = [r["ppl"] / dense[r["seed"]] for r in rs]
        body.append([m, ratio, len(rs), statistics.median(r["ppl"] for r in rs), statistics.median(mult),
                     f"{min(mult):.2f}-{max(mult):.2f}", statistics.median(r["greedy_agreement"] for r in rs)])
    return tabulate(body, headers=["method", "ratio", "seeds", "continuation ppl", "x dense", "range",
                                   "greedy agreement"], floatfmt=".3g", tablefmt="github")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help=f"a known model ({', '.join(KNOWN_MODELS)}) or a random arch "
                                   f"({', '.join(RANDOM_ARCHS)}); default: llama-2b-shaped, with --quality smollm2-135m")
    p.add_argument("--layers", type=int, help="random archs: this many decoder layers")
    p.add_argument("--shapes", type=_shapes, default=[(1, 128), (8, 128), (1, 512), (8, 512)])
    p.add_argument("--new", type=int, default=128)
    p.add_argument("--ratio", type=float, default=0.4)
    p.add_argument("--methods", help=f"default: {','.join(METHODS)} (pp@0: pp at ratio 0); --quality: "
                                     f"{','.join(QUALITY_METHODS)} (dense always runs)")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", help="float32, bfloat16, float16 or auto; default auto, with --quality float32")
    p.add_argument("--out", type=Path, help="default bench/results/generate_<model>_<device>[_<dtype>].json "
                                            "(continuation_<model>[_<dtype>].json with --quality; no dtype in the "
                                            "name for float32)")
    p.add_argument("--from-json", type=Path, nargs="+", help="print the tables of earlier runs and exit")
    p.add_argument("--quality", action="store_true", help="continuation perplexity and greedy agreement instead")
    add_protocol_args(p)
    p.add_argument("--ratios", type=lambda s: [float(x) for x in s.split(",")], default=[0.2, 0.4])
    p.add_argument("--seeds", default="0,1,2", help="--quality: calibration seeds")
    p.add_argument("--greedy", type=int, default=64, help="--quality: new tokens compared with dense's")
    args = p.parse_args()
    args.model = args.model or ("smollm2-135m" if args.quality else "llama-2b-shaped")
    if args.from_json:
        rows = [r for f in args.from_json for r in json.loads(f.read_text())]
        print(quality_table(rows) if "greedy_agreement" in rows[0] else table(rows))
        return
    dtype = parse_dtype(args.dtype or ("float32" if args.quality else "auto"), args.device)
    suffix = dtype_suffix(dtype)
    machine = device_name(args.device)
    if args.quality:
        if args.model not in KNOWN_MODELS and not Path(args.model).is_dir():
            raise SystemExit("--quality needs a real model (e.g. smollm2-135m): random weights have no quality")
        rows = [{"model": args.model, "dtype": dtype_name(dtype), "data": args.data, "seq_len": args.seq_len, **r,
                 "machine": machine, "torch": torch.__version__} for r in continuation_quality(args, dtype)]
        out = args.out or ROOT / f"bench/results/continuation_{args.model}{suffix}.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(rows, indent=2) + "\n")
        print(quality_table(rows) + f"\n\n{args.model} ({dtype_name(dtype)}), {args.data}, {machine}; JSON: {out}")
        return
    device = torch.device(args.device)
    torch._inductor.config.force_disable_caches = True
    overrides = {"num_hidden_layers": args.layers} if args.layers else {}
    model, vocab = _model(args.model, device, dtype, **overrides)
    name = args.model + (f"-{args.layers}l" if args.layers else "")
    rows = [{"model": name, "dtype": dtype_name(dtype), **r, "machine": machine, "torch": torch.__version__}
            for r in run(model, vocab, args.shapes, args.new, args.ratio, (args.methods or ",".join(METHODS)).split(","),
                         args.reps, device)]
    out = args.out or ROOT / f"bench/results/generate_{name}_{device.type}{suffix}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(rows, indent=2) + "\n")
    print(table(rows) + f"\n\n{name} ({dtype_name(dtype)}), {machine}, torch {torch.__version__}, median of {args.reps} rounds; JSON: {out}")


if __name__ == "__main__":
    main()
