"""Progress lines: one when a compile starts, one with its time when it ends; none when quiet."""
import re

from ppcompile import progress


def test_a_compile_prints_a_start_line_and_an_end_line_with_its_time(capfd, monkeypatch):
    monkeypatch.delenv("PPCOMPILE_QUIET", raising=False)
    with progress.compiling("graph 1 (forward)"):
        pass
    err = capfd.readouterr().err
    assert re.fullmatch(r"\[ppcompile\] compiling graph 1 \(forward\) \.\.\.\n"
                        r"\[ppcompile\] compiled graph 1 \(forward\) in \d+\.\d s\n", err)


def test_quiet_or_the_environment_turn_them_off(capfd, monkeypatch):
    monkeypatch.delenv("PPCOMPILE_QUIET", raising=False)
    with progress.compiling("graph 1", quiet=True):
        pass
    monkeypatch.setenv("PPCOMPILE_QUIET", "1")
    with progress.compiling("graph 2"):
        pass
    assert capfd.readouterr().err == ""
