"""Write a bench's output into its README block: the text between `<!-- NAME:start -->` and
`<!-- NAME:end -->`, so that every number in the README is one a bench printed."""
from __future__ import annotations

import json
import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def replace_block(name: str, text: str, readme: Path = README) -> None:
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    old = readme.read_text()
    if start not in old:
        raise SystemExit(f"README.md has no {start} ... {end} block")
    block = f"{start}\n{text}\n{end}"
    readme.write_text(re.sub(rf"{re.escape(start)}.*?{re.escape(end)}", lambda m: block, old, flags=re.S))


def rows_of(args, run) -> list[dict]:
    """A bench's rows: read from `args.from_json`, or made by `run(args)` and written to `args.out`."""
    if args.from_json:
        return json.loads(args.from_json.read_text())
    rows = run(args)
    args.out.write_text(json.dumps(rows, indent=2) + "\n")
    return rows


def publish(name: str, text: str, args) -> None:
    """Print a bench's text and, unless `args.no_readme`, write it into README block `name`."""
    print(text)
    if not args.no_readme:
        replace_block(name, text)
