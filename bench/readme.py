"""Write a bench's output into its block of a document: the text between `<!-- NAME:start -->` and
`<!-- NAME:end -->`, so that every number in the documents is one a bench printed.

The measurements' blocks live in docs/results.md (the default); the README's one headline block
is named explicitly (`doc=README`). `python bench/results.py` refills every block from
bench/results/; it points RESULTS and README at copies when asked to (`--into DIR`), which is why
both are looked up when a block is written, not when this module is imported.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
RESULTS = ROOT / "docs" / "results.md"
WRITTEN: list[str] = []  # the blocks written in this process, in order (bench/results.py checks them)


def replace_block(name: str, text: str, doc: Path | None = None) -> None:
    """Replace block `name` of `doc` (default: docs/results.md) with `text`."""
    doc = Path(doc) if doc is not None else RESULTS
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    old = doc.read_text()
    if start not in old or end not in old:
        raise SystemExit(f"{doc} has no {start} ... {end} block")
    block = f"{start}\n{text}\n{end}"
    doc.write_text(re.sub(rf"{re.escape(start)}.*?{re.escape(end)}", lambda m: block, old, flags=re.S))
    WRITTEN.append(name)


def blocks(doc: Path) -> list[str]:
    """The names of the blocks `doc` holds, in order."""
    return re.findall(r"<!-- ([\w.-]+):start -->", Path(doc).read_text())


def model_name(key: str) -> str:
    """How a bench's printed text names a model: a known model as what load_model(key) loads
    (SmolLM2-135M-Instruct, Q4_1 GGUF, dequantized), a random arch with its shape, else the key."""
    from ppcompile.models import KNOWN_MODELS, RANDOM_ARCHS
    if key in KNOWN_MODELS:
        name, _, quant = Path(KNOWN_MODELS[key].filename).stem.partition(".")  # SmolLM2-135M-Instruct.Q4_1
        return f"{name} ({quant} GGUF, dequantized)" if quant else name
    base, _, layers = key.rpartition("-")  # generate.py names a --layers run "<arch>-<N>l"
    arch, cfg = (base, {"num_hidden_layers": int(layers[:-1])}) if layers[:-1].isdigit() and layers.endswith("l") \
        and base in RANDOM_ARCHS else (key, {})
    if arch in RANDOM_ARCHS:
        model_type, defaults = RANDOM_ARCHS[arch]
        c = {**defaults, **cfg}
        heads, kv = c.get("num_attention_heads"), c.get("num_key_value_heads", c.get("num_attention_heads"))
        return (f"{key} (random {model_type} weights: {c.get('num_hidden_layers')} layers, hidden "
                f"{c.get('hidden_size')}, MLP {c.get('intermediate_size', c.get('ffn_dim'))}, {heads} heads, "
                f"{kv} K/V heads, vocab {c.get('vocab_size')})")
    return key


def rows_of(args, run) -> list[dict]:
    """A bench's rows: read from `args.from_json`, or made by `run(args)` and written to `args.out`."""
    if args.from_json:
        return json.loads(args.from_json.read_text())
    rows = run(args)
    args.out.write_text(json.dumps(rows, indent=2) + "\n")
    return rows


def publish(name: str, text: str, args, doc: Path | None = None) -> None:
    """Print a bench's text and, unless `args.no_readme`, write it into block `name` of `doc`
    (default: docs/results.md)."""
    print(text)
    if not args.no_readme:
        replace_block(name, text, doc)
