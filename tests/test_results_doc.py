"""docs/results.md and the README's two blocks (headline, vllm) are what `python bench/results.py` makes from
bench/results/: regenerated into a temporary copy (the real files are not written), they equal the
files in the checkout, so a second run changes nothing. No model runs: only the benches'
--from-json / --report paths."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOCS = ("docs/results.md", "README.md")


def _blocks(text: str) -> dict[str, str]:
    return dict(re.findall(r"<!-- ([\w.-]+):start -->\n(.*?)\n<!-- \1:end -->", text, flags=re.S))


def test_regeneration_reproduces_the_committed_files(tmp_path):
    before = {name: (ROOT / name).read_bytes() for name in DOCS}
    out = subprocess.run([sys.executable, str(ROOT / "bench" / "results.py"), "--into", str(tmp_path)],
                         cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr
    for name in DOCS:
        assert (ROOT / name).read_bytes() == before[name], f"the regeneration wrote the real {name}"
        committed, regenerated = (ROOT / name).read_text(), (tmp_path / name).read_text()
        assert _blocks(regenerated) == _blocks(committed), f"{name}: a block differs; run python bench/results.py"
        assert regenerated == committed, f"{name} differs from its regeneration; run python bench/results.py"
    # the README's results blocks: the headline, and vLLM's serving figures beside their command
    assert list(_blocks((ROOT / "README.md").read_text())) == ["vllm", "headline"]
    assert len(_blocks((ROOT / "docs/results.md").read_text())) > 1


def test_a_block_names_the_cpu_and_its_bf16_unit_that_its_rows_recorded(bench_module):
    results = bench_module("results")
    amx = {"provenance": {"cpu": "Xeon", "cpu_bf16": "AMX"}}
    rows = [amx, amx, {"provenance": {"cpu": "EPYC", "cpu_bf16": "AVX-512 BF16"}}, {"provenance": {"cpu": "Old"}}, {}]
    assert results._cpus(rows) == ", on EPYC (AVX-512 BF16) and Old and Xeon (AMX)"
    assert results._cpus([{}, {"provenance": {}}]) == ""  # rows from before the record: nothing claimed
