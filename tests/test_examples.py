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
def test_calibration_reuse(tmp_path):
    out = _run(str(EXAMPLES / "calibration_reuse.py"), str(tmp_path / "cal.pt"), cwd=tmp_path)
    assert (tmp_path / "cal.pt").is_file() and "flap@0.4" in out


@pytest.mark.real_model
@pytest.mark.inductor
def test_generate(tmp_path):
    out = _run(str(EXAMPLES / "generate.py"), cwd=tmp_path)
    assert "forwards pruned (1 prefill + decode steps), 0 unpruned" in out and out.count("  pp   : ") == 2


@pytest.mark.real_model
def test_tensor_parallel(tmp_path):
    torchrun = Path(sys.executable).with_name("torchrun")
    done = subprocess.run([str(torchrun), "--nproc-per-node", "3", str(EXAMPLES / "tensor_parallel.py")], cwd=tmp_path,
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("of 3 and 320 of 512 channels") == 3 and "pp@0.4 on 3 ranks loss" in done.stdout
