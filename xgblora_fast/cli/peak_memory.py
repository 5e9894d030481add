"""Peak resident memory of this process per phase of a run (loading, training, evaluation), for
the run's summary. Linux only: the kernel's high-water mark (VmHWM), restarted at each phase by
writing 5 to /proc/self/clear_refs; elsewhere no figures.

A restart also lowers the mark the kernel reports at exit (``ru_maxrss``): the process's peak is
the highest of the phases' and that exit figure (which covers the time after the last phase)."""

from __future__ import annotations

import contextlib
import ctypes
from collections.abc import Iterator
from pathlib import Path


def peak_rss_mib() -> float | None:
    """This process's peak resident memory (MiB) since it started or the last restart."""
    try:
        status = Path("/proc/self/status").read_text()
    except OSError:
        return None
    return int(status.split("VmHWM:")[1].split()[0]) / 1024  # kB


def restart_peak_rss() -> bool:
    """Restart the peak at the memory in use; True where the kernel took it. glibc's
    ``malloc_trim`` first hands freed heap pages back, so an earlier phase's garbage (a
    checkpoint's load, say) does not count."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


class PhasePeaks:
    """Highest resident memory (MiB) per named phase; a phase may be entered many times (the
    training loop between its evaluations) and keeps its highest. The first phase,
    ``first``, began with the process. ``peaks`` stays empty where /proc is missing."""

    def __init__(self, first: str = "loading") -> None:
        self.peaks: dict[str, float] = {}
        self.current: str | None = first

    def enter(self, name: str | None) -> None:
        """End the current phase (recording its peak) and start ``name`` (None: no phase)."""
        if self.current is not None:
            peak = peak_rss_mib()
            if peak is not None:
                self.peaks[self.current] = max(peak, self.peaks.get(self.current, 0.0))
        self.current = name if name is not None and restart_peak_rss() else None

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """``name`` for the ``with`` block, then back to the phase it interrupted."""
        interrupted = self.current
        self.enter(name)
        try:
            yield
        finally:
            self.enter(interrupted)
