"""Every example runs as written (on the packaged model; two of them compile with Inductor)."""
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def _run(*args: str, cwd: Path) -> str:
    done = subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


@pytest.mark.real_model
@pytest.mark.inductor
def test_quick_start(tmp_path):
    out = _run(str(EXAMPLES / "quick_start.py"), cwd=tmp_path)
    assert "pp@0.4 loss" in out and "54 blocks pruned" in out and "6/9 heads, 896/1536 channels" in out


@pytest.mark.real_model
@pytest.mark.inductor
def test_torch_compile_backend(tmp_path):
    out = _run(str(EXAMPLES / "torch_compile_backend.py"), cwd=tmp_path)
    assert "logits (4, 128, 49152); 54 blocks pruned" in out


@pytest.mark.real_model
@pytest.mark.slow
def test_calibration_reuse(tmp_path):
    out = _run(str(EXAMPLES / "calibration_reuse.py"), str(tmp_path / "cal.pt"), cwd=tmp_path)
    assert (tmp_path / "cal.pt").is_file() and "flap@0.4" in out


@pytest.mark.real_model
@pytest.mark.inductor
def test_generate(tmp_path):
    out = _run(str(EXAMPLES / "generate.py"), cwd=tmp_path)
    assert "forwards pruned (1 prefill + decode steps), 0 unpruned" in out and out.count("  pp   : ") == 2


ROOT = EXAMPLES.parent
SMOLLM2 = dict(layers=30, heads=9, channels=1536)  # SmolLM2-135M's shape (and 3 K/V heads)


def _documented_torchrun(nproc: int) -> str:
    """The command the README's "Tensor parallel" and docs/distributed.md give for `nproc` ranks:
    the same line in both."""
    line = f"torchrun --nproc-per-node {nproc} examples/tensor_parallel.py"
    for doc in (ROOT / "README.md", ROOT / "docs" / "distributed.md"):
        assert line in doc.read_text().splitlines(), f"{doc.name} does not document `{line}`"
    return line


def _dense_loss() -> float:
    """The example's dense loss, computed here in one process."""
    import torch

    from ppcompile import data
    from ppcompile.models import load_model
    model, tokenizer = load_model("smollm2-135m")
    ids = data.token_windows("brown:a", tokenizer, seq_len=128, n_windows=4)
    with torch.no_grad():
        return model(ids, labels=ids).loss.item()


@pytest.mark.real_model
@pytest.mark.slow  # spawns ranks
@pytest.mark.parametrize("nproc", [2, 3])
def test_tensor_parallel(nproc):
    import json
    import re
    import shlex

    from ppcompile import PPConfig
    command = shlex.split(_documented_torchrun(nproc))
    command[0] = str(Path(sys.executable).with_name("torchrun"))  # this environment's
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    # what a rank keeps of layer 3 (the first pruned): a block of its size's rule at 0.4
    rule, n, heads, channels = PPConfig(ratio=0.4), SMOLLM2["layers"], SMOLLM2["heads"], SMOLLM2["channels"]
    local = channels // nproc
    if nproc == 2:  # 3 K/V heads do not split over 2: the attention stays whole on every rank
        attention = r"attention replicated \(9 heads on every rank\), keeps heads (\[[\d, ]*\])"
        kept_heads = rule.kept_heads(heads, n)  # 6 of 9
        assert done.stderr.count("3 K/V heads do not split over 2 ranks: attention replicated") == 1
    else:
        attention = r"attention keeps local heads (\[[\d, ]*\]) of its 3 \(of 9\)"
        kept_heads = rule.kept_heads(heads // nproc, n)  # 2 of 3
        assert "replicated" not in done.stderr
    lines = [re.fullmatch(rf"rank (\d) of {nproc}: layer 3 {attention}; MLP keeps (\d+) of its {local} channels "
                          rf"\(of {channels}\)", line) for line in done.stdout.splitlines()[:nproc]]
    assert all(lines), done.stdout
    assert sorted(int(m[1]) for m in lines) == list(range(nproc))
    assert all(len(json.loads(m[2])) == kept_heads and int(m[3]) == rule.kept_channels(local, n) for m in lines)
    if nproc == 2:  # a replicated block is pruned alike on every rank
        assert len({m[2] for m in lines}) == 1
    loss = re.search(rf"dense loss (\d+\.\d+), pp@0\.4 on {nproc} ranks loss (\d+\.\d+)", done.stdout)
    assert loss, done.stdout
    assert abs(float(loss[1]) - _dense_loss()) < 1e-3 and float(loss[2]) > float(loss[1])