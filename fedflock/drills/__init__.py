"""Fault drills (issue #8): prove that fedflock loses no update and counts none twice when
brokers die, links drop and devices lose power (docs/drills.md).

* :mod:`~fedflock.drills.plans` — fault plans as data (drop after N bytes, cut mid-packet,
  delay, blackhole, mute), seeded, and the pure per-chunk decision.
* :mod:`~fedflock.drills.proxy` — :class:`FaultProxy`, the TCP proxy that applies a plan.
* :mod:`~fedflock.drills.processes` — ``fedflock agent`` / ``fedflock broker`` subprocesses
  (start, SIGKILL, restart) and read-only views of an agent's outbox.
* :mod:`~fedflock.drills.server` — an in-process server with a SQLite store, rounds on a thread.
* :mod:`~fedflock.drills.crash` — the opt-in crash hook of ``fedflock agent``
  (``FEDFLOCK_DRILL_CRASH``).
* :mod:`~fedflock.drills.disk` — a size-limited directory (tmpfs) for the disk-full drill.
* :mod:`~fedflock.drills.report` — the exactly-once verdict from the server's store, and the
  drill report (one JSON line).

Used by ``tests/integration/test_drill_*.py`` (suite size) and ``benchmarks/drills.py`` (full size).
"""
