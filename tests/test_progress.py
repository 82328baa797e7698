"""Progress beside the reference's log lines: plain lines off a terminal; on one, a bar that is
cleared before each logged line and redrawn after it (the bar on stderr, the log on stdout)."""

from __future__ import annotations

import io
import sys

from jaxft.progress import Progress


def test_plain_lines_off_a_terminal():
    lines: list[str] = []
    progress = Progress(20, "epoch 1/1", "examples", lines.append, terminal=False)
    for _ in range(20):
        progress.update(8, 0.5)
    progress.write("Ep 1 (Step 000019): Train loss 0.500, Val loss 0.600")
    progress.close()
    assert len(lines) == 11 and lines[0].startswith("epoch 1/1: step 2/20 (10%)") and "examples/s" in lines[0]
    assert lines[-2].startswith("epoch 1/1: step 20/20 (100%)") and lines[-2].endswith("loss 0.500")
    assert lines[-1] == "Ep 1 (Step 000019): Train loss 0.500, Val loss 0.600"


def test_a_logged_line_clears_the_bar_first(monkeypatch):
    screen = io.StringIO()  # a terminal: stdout and stderr end up on one screen
    monkeypatch.setattr(sys, "stdout", screen)
    monkeypatch.setattr(sys, "stderr", screen)
    progress = Progress(10, "epoch 1/1", "examples", print, terminal=True)
    progress.update(8, 0.5)
    progress.bar.refresh()
    drawn = screen.getvalue()
    assert "epoch 1/1" in drawn and "loss 0.500" in drawn
    progress.write("Ep 1 (Step 000000): Train loss 0.665, Val loss 0.709")
    progress.close()
    before, line, after = screen.getvalue()[len(drawn):].partition("Ep 1 (Step 000000): Train loss 0.665, Val loss 0.709\n")
    assert line, "the line was not printed"
    assert before.endswith("\r") and before.strip() == "", repr(before)  # the bar erased, the line from column 0
    assert "epoch 1/1" in after  # and drawn again below it
