"""progress(): a live tqdm bar on a terminal, a few plain lines anywhere else.

Time is driven through the injectable clock, never slept: each test knows exactly how many
seconds its bar "ran", so the number of lines is exact arithmetic, not a timing guess.
"""

import io
import math
import re
from pathlib import Path

import pytest
from tqdm import tqdm

import feedrank
from feedrank.progress import DEFAULT_INTERVAL_S, LineBar, progress


class Clock:
    """A clock the test sets by hand."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_file_gets_one_line_per_interval_and_one_at_the_end_whatever_the_number_of_updates():
    log, clock = io.StringIO(), Clock()
    updates, tick = 100_000, 1 / 1024  # a power of two: every clock reading and difference is exact
    with progress(total=updates, desc="rows", stream=log, clock=clock) as bar:
        assert isinstance(bar, LineBar)
        for i in range(1, updates + 1):
            clock.now = i * tick
            bar.update()
    lines = log.getvalue().splitlines()
    duration = updates * tick  # 97.7 s
    assert len(lines) == math.floor(duration / DEFAULT_INTERVAL_S) + 1  # 19 periodic lines and the final one
    assert "\r" not in log.getvalue()
    assert lines[-1].startswith("rows: 100% 100000/100000")


def test_lines_carry_the_count_percent_rate_and_postfix():
    log, clock = io.StringIO(), Clock()
    bar = progress(total=1000, desc="train", unit="step", stream=log, clock=clock, interval_s=2.0)
    bar.set_postfix(loss="0.5", lr=0.001, refresh=False)
    for i in range(1, 501):
        clock.now = i / 100  # 100 steps per second: 500 steps take 5 s
        bar.update()
    lines = log.getvalue().splitlines()
    assert len(lines) == 2  # at 2 s and 4 s
    clock.now = 5.0
    bar.close()
    last = log.getvalue().splitlines()[-1]
    assert last.startswith("train:  50% 500/1000")
    assert "100.00step/s" in last
    assert "loss=0.5" in last and "lr=0.001" in last


def test_the_final_line_always_appears():
    log = io.StringIO()
    for _ in progress(range(3), desc="fast", stream=log, clock=Clock()):
        pass  # no time passes: no periodic line, but the end is still reported
    assert log.getvalue().splitlines() == [tqdm.format_meter(3, 3, 0.0, ncols=0, prefix="fast")]

    log = io.StringIO()
    with pytest.raises(RuntimeError):
        with progress(total=10, desc="broken", stream=log, clock=Clock()) as bar:
            bar.update(4)
            raise RuntimeError("boom")
    assert log.getvalue().splitlines()[-1].startswith("broken:  40% 4/10")

    log = io.StringIO()
    for i in progress(range(10), desc="left early", stream=log, clock=Clock()):
        if i == 2:
            break
    assert log.getvalue().splitlines()[-1].startswith("left early:  20% 2/10")


def test_close_writes_the_final_line_once():
    log = io.StringIO()
    bar = progress(total=2, stream=log, clock=Clock())
    bar.update(2)
    bar.close()
    bar.close()
    assert len(log.getvalue().splitlines()) == 1


def test_resumed_bars_rate_counts_only_the_new_units():
    log, clock = io.StringIO(), Clock()
    bar = progress(total=300, initial=100, unit="step", stream=log, clock=clock)
    bar.update(100)
    clock.now = 10.0
    bar.close()
    assert log.getvalue().startswith(" 67% 200/300")
    assert "10.00step/s" in log.getvalue()


def test_a_terminal_gets_a_live_tqdm_bar():
    term = Terminal()
    with progress(total=5, desc="live", stream=term) as bar:
        assert isinstance(bar, tqdm) and not bar.disable
        for _ in range(5):
            bar.update()
    assert "\r" in term.getvalue()  # tqdm redraws in place
    assert "live: 100%" in term.getvalue() and "5/5" in term.getvalue()


@pytest.mark.parametrize("stream", [io.StringIO(), Terminal()], ids=["file", "terminal"])
def test_a_disabled_bar_writes_nothing(stream):
    items = list(progress(range(4), stream=stream, enabled=False))
    with progress(total=4, stream=stream, enabled=False) as bar:
        bar.update(4)
        bar.set_postfix(loss=1.0)
    assert items == [0, 1, 2, 3]
    assert stream.getvalue() == ""


def test_a_stream_without_isatty_counts_as_a_file():
    class Sink:
        def __init__(self) -> None:
            self.text = ""

        def write(self, s: str) -> None:
            self.text += s

        def flush(self) -> None:
            pass

    sink = Sink()
    progress(total=1, stream=sink, clock=Clock()).close()  # type: ignore[arg-type]
    assert sink.text.endswith("\n") and "0/1" in sink.text


def test_the_interval_must_be_positive():
    with pytest.raises(ValueError, match="interval_s must be > 0"):
        progress(total=1, stream=io.StringIO(), interval_s=0)


def test_every_progress_bar_in_feedrank_goes_through_progress():
    """One mechanism: only progress.py may import tqdm, so no bar can flood a log again."""
    root = Path(feedrank.__file__).parent
    imports = re.compile(r"^\s*(from tqdm\b|import tqdm\b)", re.M)
    users = [p.relative_to(root).as_posix() for p in root.rglob("*.py")
             if p.name != "progress.py" and imports.search(p.read_text(encoding="utf-8"))]  # fmt: skip
    assert users == []
