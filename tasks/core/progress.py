"""Progress bars that others can watch: tqdm for the terminal, and listeners (the orchestrator's progress artifact)
told where a long loop stands. tasks/ knows nothing of Prefect: flows/ registers the listener.
"""

from __future__ import annotations

from collections.abc import Callable

from tqdm.auto import tqdm as _tqdm

Listener = Callable[[str, float, bool], None]  # (what, fraction done, finished)
_LISTENERS: list[Listener] = []


def add_listener(listener: Listener) -> None:
    """Tell `listener` about every bar's progress from now on (once per listener)."""
    if listener not in _LISTENERS:
        _LISTENERS.append(listener)


class tqdm(_tqdm):  # noqa: N801 - a drop-in for tqdm's own name
    """tqdm that also tells the listeners, as often as it redraws (iterating calls update on each redraw) and once
    when it closes (iterating closes it at the end), so the cost stays that of the bar."""

    def _tell(self, finished: bool) -> None:
        if not _LISTENERS or not self.total:
            return
        what = str(self.desc or "work").strip(": ")
        for listener in _LISTENERS:
            listener(what, min(1.0, self.n / self.total), finished)

    def update(self, n: float | None = 1) -> bool | None:
        shown = super().update(n)
        if shown:
            self._tell(False)
        return shown

    def close(self) -> None:
        if not getattr(self, "_told_close", False) and not self.disable:
            self._told_close = True
            self._tell(True)
        super().close()
