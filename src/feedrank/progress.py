"""Progress bars that suit the stream they write to: the one progress mechanism in feedrank.

On a terminal a live tqdm bar is the right thing. Redirected to a file (a demo log, CI output,
``nohup``), tqdm's carriage-return redraws become thousands of lines per bar and a log holds
megabytes of them. So ``progress`` returns a tqdm bar when the stream is a terminal, and
otherwise a ``LineBar`` that writes one plain line at most every ``interval_s`` seconds, plus
one final line when it closes, with the same figures (count, total, percent, elapsed, rate,
postfix) formatted by tqdm's own ``format_meter``.

Both kinds support what feedrank's loops use: iteration, ``update(n)``, ``set_postfix(...)``,
``close()`` and use as a context manager. ``enabled=False`` gives a bar that prints nothing.

Example (a file is not a terminal, so this writes a handful of lines, not 100,000)::

    import io
    log = io.StringIO()
    for _ in progress(range(100_000), desc="demo", unit="row", stream=log):
        pass
    log.getvalue().splitlines()[-1]   # 'demo: 100% 100000/100000 [00:00<00:00, ...row/s]'
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any, TextIO

from tqdm import tqdm

DEFAULT_INTERVAL_S = 5.0


class LineBar:
    """A progress bar for a stream that is not a terminal: a plain line every ``interval_s``.

    A line is written on an ``update`` that comes at least ``interval_s`` after the last line
    (or after the start), and once more on ``close``, so a log holds about
    ``duration / interval_s + 1`` lines per bar whatever the number of updates. ``clock`` is
    injectable so tests drive time instead of sleeping.
    """

    def __init__(self, iterable: Iterable[Any] | None, total: float | None, desc: str, unit: str, unit_scale: bool,
                 initial: float, stream: TextIO, interval_s: float, clock: Callable[[], float]) -> None:  # fmt: skip
        if not interval_s > 0:
            raise ValueError(f"progress interval_s must be > 0, got {interval_s!r}")
        if total is None and iterable is not None and hasattr(iterable, "__len__"):
            total = len(iterable)  # type: ignore[arg-type]
        self.iterable = iterable
        self.total = total
        self.desc = desc
        self.unit = unit
        self.unit_scale = unit_scale
        self.initial = initial
        self.n = initial
        self.stream = stream
        self.interval_s = interval_s
        self.clock = clock
        self.postfix = ""
        self.started = clock()
        self.last_line = self.started
        self.closed = False

    def __iter__(self) -> Iterator[Any]:
        if self.iterable is None:
            raise TypeError("this progress bar was made without an iterable: call update() instead")
        try:
            for item in self.iterable:
                yield item
                self.update()
        finally:
            self.close()

    def __enter__(self) -> LineBar:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def update(self, n: float = 1) -> None:
        """Count ``n`` more units; write a line if ``interval_s`` has passed since the last one."""
        self.n += n
        now = self.clock()
        if now - self.last_line >= self.interval_s:
            self._write(now)

    def set_postfix(self, ordered_dict: dict[str, Any] | None = None, refresh: bool = True, **kwargs: Any) -> None:
        """Figures shown after the rate (``loss=0.41``), as tqdm's ``set_postfix``; shown on the next line."""
        items = {**(ordered_dict or {}), **kwargs}
        self.postfix = ", ".join(
            f"{key}={tqdm.format_num(value) if isinstance(value, (int, float)) else value}" for key, value in items.items()
        )

    def close(self) -> None:
        """Write the final line (once)."""
        if not self.closed:
            self.closed = True
            self._write(self.clock())

    def line(self, now: float) -> str:
        """The line for the state at clock time ``now``: tqdm's figures without the bar."""
        return tqdm.format_meter(self.n, self.total, now - self.started, ncols=0, prefix=self.desc, unit=self.unit,
                                 unit_scale=self.unit_scale, postfix=self.postfix or None, initial=self.initial)  # fmt: skip

    def _write(self, now: float) -> None:
        self.stream.write(self.line(now) + "\n")
        self.stream.flush()
        self.last_line = now


def _is_terminal(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


def progress(iterable: Iterable[Any] | None = None, total: float | None = None, desc: str = "", unit: str = "it",
             unit_scale: bool = False, initial: float = 0, enabled: bool = True, stream: TextIO | None = None,
             interval_s: float = DEFAULT_INTERVAL_S, clock: Callable[[], float] = time.monotonic) -> tqdm | LineBar:  # fmt: skip
    """A progress bar over ``iterable`` (or driven by ``update``) that suits ``stream`` (default stderr).

    A terminal gets a live tqdm bar; anything else a ``LineBar`` (a line every ``interval_s``
    seconds and one at the end). ``enabled=False`` gives a silent bar, so callers pass their
    ``progress`` flag straight through instead of branching.
    """
    stream = sys.stderr if stream is None else stream
    if not enabled:
        return tqdm(iterable, total=total, disable=True)
    if _is_terminal(stream):
        return tqdm(iterable, total=total, desc=desc, unit=unit, unit_scale=unit_scale, initial=initial, file=stream,
                    dynamic_ncols=True)  # fmt: skip
    return LineBar(iterable, total, desc, unit, unit_scale, initial, stream, interval_s, clock)
