"""Run one vLLM engine on the packaged SmolLM2 (dense, or pruned through the ppcompile plugin) over a
few prompts of mixed lengths, greedy, and print one JSON line: the texts, the worker's step counts
and site statuses, and how many times the backbone ran (counted by a hook of its own, apart from
the backend's counts). A script, not a test: each engine is its own process (tests/test_vllm_plugin.py).

    python tests/vllm_generate.py [--ratio R] [--options JSON]
"""
import argparse
import json

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "In the beginning of the nineteenth century the town had grown along the river, " * 12
    + "and the people who lived there",
    "Once upon a time, in a small village by the sea, there lived an old fisherman who " * 4 + "one day",
    "Q: What is two plus two?\nA:",
]


def count_backbone_calls(worker):
    """Count the backbone's calls from now on (vLLM's compile wrapper replaces its class's __call__,
    so a forward hook would not run)."""
    backbone = worker.model_runner.model.model
    backbone.pp_calls = 0
    cls, call = type(backbone), type(backbone).__call__

    def counted(self, *args, **kwargs):
        self.pp_calls = getattr(self, "pp_calls", 0) + 1
        return call(self, *args, **kwargs)
    cls.__call__ = counted


def report(worker):
    from ppcompile import vllm_backend
    b = vllm_backend._BACKEND
    return {"calls": worker.model_runner.model.model.pp_calls, **(b.summary() if b is not None else {})}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--ratio", type=float, default=None, help="prune through ppcompile (default: dense vLLM)")
    ap.add_argument("--options", default="{}", help="more ppcompile options, as JSON")
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--enforce-eager", action="store_true", help="vLLM runs the model uncompiled")
    args = ap.parse_args()
    from vllm import LLM, SamplingParams
    from ppcompile.models import checkpoint_folder
    from ppcompile.vllm_plugin import engine_args
    extra = {} if args.ratio is None else engine_args(ratio=args.ratio, **json.loads(args.options))
    llm = LLM(str(checkpoint_folder("smollm2-135m")), dtype="bfloat16", max_model_len=512, max_num_seqs=4,
              max_num_batched_tokens=256, seed=0, enforce_eager=args.enforce_eager, **extra)
    llm.collective_rpc(count_backbone_calls)
    outs = llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=args.max_tokens), use_tqdm=False)
    print("RESULT " + json.dumps({"texts": [o.outputs[0].text for o in outs], **llm.collective_rpc(report)[0]}))


if __name__ == "__main__":
    main()
