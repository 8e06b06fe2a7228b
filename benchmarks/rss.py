"""Peak resident memory of another process, sampled with psutil (shared by the benchmarks)."""

from __future__ import annotations

import threading
import time

import psutil


class RssSampler:
    """Samples a process's RSS in a thread until stopped; remembers the peak and a timeline."""

    def __init__(self, pid: int, interval_s: float = 0.005) -> None:
        self._process = psutil.Process(pid)
        self._interval = interval_s
        self._stop = threading.Event()
        self.samples: list[tuple[float, int]] = []
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> RssSampler:
        self._thread.start()
        return self

    def _run(self) -> None:
        start = time.monotonic()
        while not self._stop.is_set():
            try:
                self.samples.append((time.monotonic() - start, self._process.memory_info().rss))
            except (psutil.NoSuchProcess, psutil.ZombieProcess):
                return
            time.sleep(self._interval)

    def stop(self) -> int:
        """Stop sampling; the peak RSS in bytes (0 if the process ended before the first sample)."""
        self._stop.set()
        self._thread.join()
        return max((rss for _, rss in self.samples), default=0)
