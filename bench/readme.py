"""Write a bench's output into its README block: the text between `<!-- NAME:start -->` and
`<!-- NAME:end -->`, so that every number in the README is one a bench printed."""
from __future__ import annotations

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
