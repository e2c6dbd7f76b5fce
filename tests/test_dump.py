"""Dumps: numbered files per compiled graph, valid Python, the site table, named rewrite steps."""
import json
import re

import pytest
import torch

import ppcompile as pp
from ppcompile.models import random_model

TINY = dict(skip_layers=(0,), mlp_multiple=16)


def _compile_and_run(tmp_path, backend, **kw):
    model = random_model("llama-gqa")
    c = pp.compile(model, 0.4, backend=backend, **TINY, **kw)
    with torch.no_grad():
        c(torch.randint(0, 128, (4, 12)))  # a probe of 8 of 48 tokens: below what pruning saves, so it runs
    return tmp_path / "graph_00"


def _assigned(name, code):
    """`name = ...` in a printed graph, with or without its recorded type (`name: "f32[4]cpu" = ...`)."""
    return re.search(rf"\b{name}(: \"[^\"]*\")? = ", code) is not None


def _check_dump(folder):
    for name in ("00_captured.py", "02_rewritten.py"):
        compile((folder / name).read_text(), name, "exec")  # valid Python
    table = (folder / "01_sites.txt").read_text()
    lines = [line for line in table.splitlines() if line.startswith("model.layers.")]
    pruned = [line for line in lines if line.split()[-2:] == ["pruned", "probe"]]  # status, what selected
    # layers 1..4 prune: one attention and one MLP site each; layer 0 is named as skipped
    assert sorted(line.split()[0] for line in pruned) == [f"model.layers.{i}.{k}" for i in range(1, 5)
                                                           for k in ("attention", "mlp")]
    assert all("skipped layer" in line for line in lines if line.startswith("model.layers.0."))
    rewritten = (folder / "02_rewritten.py").read_text()
    for kind in ("attention", "mlp"):  # the selection, once per kind, shared by every layer
        body = rewritten.split(f"class pp_{kind}_select_")[1]
        for step in ("_probe_select", "_probe_energy", "_score", "_select", "_gather_final_w"):
            assert _assigned(f"{kind}{step}", body), f"{kind}{step}"
        for i in range(1, 5):
            tag = f"model_layers_{i}_{kind}"
            for step in ("_select_call", "_select", "_gather_final_w", "_history_update"):
                assert _assigned(f"{tag}{step}", rewritten), f"{tag}{step}"
    report = json.loads((folder / "report.json").read_text())
    assert report["pruned"] == 8 and report["config"]["ratio"] == 0.4
    return report


def test_dump_dir_from_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("PPCOMPILE_DUMP", str(tmp_path))
    folder = _compile_and_run(tmp_path, "eager")
    assert sorted(p.name for p in folder.iterdir()) == ["00_captured.py", "01_sites.txt", "02_rewritten.py", "report.json"]
    _check_dump(folder)


@pytest.mark.inductor
def test_dump_holds_the_inductor_code(tmp_path):
    folder = _compile_and_run(tmp_path, "inductor", dump_dir=tmp_path)
    assert sorted(p.name for p in folder.iterdir()) == ["00_captured.py", "01_sites.txt", "02_rewritten.py",
                                                        "03_inductor.py", "report.json"]
    report = _check_dump(folder)
    code = (folder / "03_inductor.py").read_text()
    compile(code, "03_inductor.py", "exec")
    assert report["inductor_code"] == "03_inductor.py" and "def call(" in code
