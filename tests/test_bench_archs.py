"""bench/archs.py's classify: a child process's end (exit status, its stage lines, its stderr) as an
outcome, so that a crash of the pass, the memory limit and the time limit are told from a model
transformers cannot build."""
import json
import signal
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"


@pytest.fixture(scope="module")
def archs(bench_module):
    return bench_module("archs")


def _stages(*names):
    return "".join(f"# stage {n}\n" for n in names)


def _traceback(*frames, exception):
    lines = ["Traceback (most recent call last):"]
    for path, line, fn in frames:
        lines += [f'  File "{path}", line {line}, in {fn}', "    code()"]
    return "\n".join(lines + [exception]) + "\n"


def _classify(archs, returncode, stdout="", stderr=""):
    return archs.classify("llama", returncode=returncode, stdout=stdout, stderr=stderr, memory_gib=6.0, seconds=300.0)


def test_a_child_that_printed_its_row_gives_that_row(archs):
    row = {"type": "llama", "outcome": "pruned", "sites": 4, "pruned": 4, "dense": {}, "error": None}
    assert _classify(archs, 0, _stages("build", "run", "compile") + json.dumps(row) + "\n") == row


def test_the_time_limit_is_timed_out_at_its_stage(archs):
    row = _classify(archs, None, _stages("build", "run"))
    assert row["outcome"] == "timed out"
    assert row["error"] == "timed out after 300 s (--seconds) running the model dense"


@pytest.mark.parametrize("returncode, stderr", [
    (-signal.SIGKILL, ""),  # the kernel's OOM killer
    (1, _traceback(("/x/transformers/modeling_utils.py", 9, "init"), exception="MemoryError")),
    (-signal.SIGABRT, "terminate called after throwing an instance of 'std::bad_alloc'\n"),
], ids=["SIGKILL", "MemoryError", "bad_alloc"])
def test_the_memory_limit_is_out_of_memory_whatever_the_stage(archs, returncode, stderr):
    row = _classify(archs, returncode, _stages("build"), stderr)
    assert row["outcome"] == "out of memory"
    assert row["error"].startswith(f"{archs._ending(returncode)} building the model, memory limit 6 GiB")


def test_an_exception_inside_ppcompile_is_a_crash_with_its_last_lines(archs):
    tb = _traceback((str(BENCH / "archs.py"), 50, "sweep_one"), ("/x/transformers/models/auto.py", 7, "from_config"),
                    (f"{archs.PACKAGE}/passes/sites.py", 123, "find_sites"), exception="KeyError: 'q_proj'")
    for stages in (("build",), ("build", "run", "compile")):  # whatever the stage: the innermost frame is ppcompile's
        row = _classify(archs, 1, _stages(*stages), tb)
        assert row["outcome"] == "crash"
        assert row["error"].endswith("KeyError: 'q_proj' (at ppcompile/passes/sites.py:123 in find_sites; "
                                     "transformers/models/auto.py:7 in from_config; archs.py:50 in sweep_one)")


def test_an_exception_in_transformers_is_not_built_while_building_and_a_crash_in_the_pass(archs):
    tb = _traceback((str(BENCH / "archs.py"), 50, "sweep_one"), ("/x/transformers/configuration.py", 7, "__init__"),
                    exception="ValueError: no such config")
    built = _classify(archs, 1, _stages("build"), tb)
    assert built == {"type": "llama", "outcome": "not built", "sites": 0, "pruned": 0, "dense": {},
                     "error": "exited with 1 building the model: ValueError: no such config"}
    assert _classify(archs, 1, _stages("build", "run"), tb)["outcome"] == "does not run"
    assert _classify(archs, 1, _stages("build", "run", "compile"), tb)["outcome"] == "crash"


@pytest.mark.parametrize("stdout, outcome", [
    (_stages("build"), "not built"), (_stages("build", "run"), "does not run"),
    (_stages("build", "run", "compile"), "crash"), ("", "crash")])
def test_a_signal_is_classified_by_its_stage_never_not_built_by_default(archs, stdout, outcome):
    row = _classify(archs, -signal.SIGSEGV, stdout)
    assert row["outcome"] == outcome and row["error"].startswith("killed by SIGSEGV")


def test_an_exit_without_a_row_or_a_stage_is_a_crash(archs):
    assert _classify(archs, 0, "")["outcome"] == "crash"
    assert _classify(archs, 2, "", "usage: archs.py ...\n")["error"] == "exited with 2 starting: usage: archs.py ..."


def test_the_legend_of_the_limits_appears_only_where_a_row_has_one(archs):
    rows = [{"type": "gpt2", "outcome": "pruned", "sites": 4, "pruned": 4, "dense": {}, "error": None}]
    assert "out of memory" not in archs.report(rows)
    rows.append({**_classify(archs, None, _stages("build")), "type": "blt"})
    assert "| timed out |             1 | blt" in archs.report(rows) and "`timed out`: the model" in archs.report(rows)
