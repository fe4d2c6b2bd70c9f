"""Progress for people and for logs: a tqdm bar on a terminal; elsewhere (CI, `dvc repro > log`, a
Kubeflow pod's log) whole lines, one at most every `ZHCLIP_PROGRESS_INTERVAL_S` seconds (10 by default)
with the count, the rate and the time left, and one when the work ends.

tqdm writes every refresh of a bar over the last with a carriage return: in a file that is one line
of thousands of characters per step. tqdm has no mode for plain lines; `display` is the hook its
docs name for another front end, so `_LogLines` overrides it and `close`.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable

from tqdm import tqdm

INTERVAL_ENV = "ZHCLIP_PROGRESS_INTERVAL_S"
# MLflow's own bars (artifact uploads and downloads) have a switch: off where ours are lines.
MLFLOW_BARS_ENV = "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"
_LINE = "{desc}: {n_fmt}/{total_fmt}{unit} ({percentage:.0f}%), {rate_fmt}, ETA {remaining}"
_LINE_NO_TOTAL = "{desc}: {n_fmt}{unit}, {rate_fmt}, {elapsed} so far"
_LAST_LINE = "{desc}: {n_fmt}{unit} in {elapsed} ({rate_fmt})"


def on_terminal() -> bool:
    """Whether progress goes to a person's terminal (tqdm writes to stderr)."""
    return sys.stderr.isatty()


def quiet_library_bars() -> None:
    """Turn off the progress bars of the libraries the steps call, where they are not on a terminal."""
    if not on_terminal():
        os.environ.setdefault(MLFLOW_BARS_ENV, "false")


class _LogLines(tqdm):
    """A tqdm that writes whole lines: a refresh at most every interval, and the last count at close."""

    def __init__(self, *args, **kwargs):
        interval = float(os.environ.get(INTERVAL_ENV) or 10)
        kwargs.update(mininterval=interval, maxinterval=max(interval, 1.0), leave=False, delay=interval)
        super().__init__(*args, **kwargs)
        self.bar_format = _LINE if self.total else _LINE_NO_TOTAL

    # tqdm's display returns False or None (tqdm/std.py); the bundled typeshed stub says None
    def display(self, msg: str | None = None, pos: int | None = None) -> bool:  # pyright: ignore[reportIncompatibleMethodOverride]
        if msg == "" or self.n == 0:  # tqdm clearing a bar, or nothing done yet: no line in a log
            return False
        self.fp.write(self.__str__() + "\n")
        self.fp.flush()
        return True

    def close(self) -> None:
        if not self.disable and self.n:
            self._ema_dt = lambda: None  # the whole run's rate, as tqdm's own closing display
            self.bar_format = _LAST_LINE
            self.display()
        super().close()


def progress_bar(iterable: Iterable | None = None, *, desc: str | None, unit: str, **kwargs) -> tqdm:
    """A progress bar over `iterable` (or updated by hand with `total=`): tqdm's on a terminal, lines
    elsewhere. `unit` names one item ("shards", "step"); tqdm's other options pass through."""
    kind = tqdm if on_terminal() else _LogLines
    return kind(iterable, desc=desc, unit=" " + unit.strip(), **kwargs)
