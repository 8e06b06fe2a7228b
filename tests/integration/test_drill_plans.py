"""The drills' pure parts: fault plans, the per-chunk decision, the exactly-once verdict and the
crash hook's parsing (hand-computed cases; the drills themselves are the other test_drill_* files)."""

from __future__ import annotations

import pytest

from edge_agent.errors import ConfigError
from edge_agent.transport.memory import InMemoryBroker, InMemoryTransport
from fedflock.drills.crash import CRASH_ENV, CrashingTransport, crash_point_from_env
from fedflock.drills.plans import Fault, FaultPlan, decide, seeded_plan
from fedflock.drills.report import RoundLedger, check_exactly_once


def test_drop_passes_exactly_after_bytes_then_cuts_inside_the_chunk() -> None:
    fault = Fault(kind="drop", after_bytes=10)
    assert decide(fault, "up", b"x" * 6, 0, 0.0, None).forward == 6
    action = decide(fault, "up", b"x" * 6, 6, 0.0, None)
    assert (action.forward, action.close) == (4, True)
    assert decide(fault, "down", b"x" * 50, 0, 0.0, None).forward == 50  # other direction untouched


def test_cut_keeps_the_head_of_the_triggering_packet_only() -> None:
    fault = Fault(kind="cut", trigger=b"/results", keep=5)
    assert decide(fault, "up", b"ping", 0, 0.0, None).forward == 4
    action = decide(fault, "up", b"\x32\x20dev/results....", 4, 0.0, None)
    assert (action.forward, action.close) == (5, True)


def test_blackhole_swallows_both_ways_until_it_ends_and_mute_only_the_answer() -> None:
    hole = decide(Fault(kind="blackhole", trigger=b"T", seconds=2.0), "up", b"..T..", 0, 10.0, None)
    assert (hole.forward, hole.hold_until, hole.hold_scope) == (0, 12.0, ("up", "down"))
    assert decide(None, "down", b"abc", 0, 11.0, 12.0).forward == 0  # held, not yet cut
    assert decide(None, "down", b"abc", 0, 12.5, 12.0).close
    mute = decide(Fault(kind="mute", trigger=b"T", seconds=1.0), "up", b"..T..", 0, 3.0, None)
    assert (mute.forward, mute.hold_until, mute.hold_scope) == (5, 4.0, ("down",))


def test_delay_waits_and_passes_everything() -> None:
    action = decide(Fault(kind="delay", direction="down", delay_s=0.25), "down", b"abc", 0, 0.0, None)
    assert (action.forward, action.wait_s, action.close) == (3, 0.25, False)


def test_plans_are_reproducible_and_validated() -> None:
    assert seeded_plan(3, 20, trigger=b"/r") == seeded_plan(3, 20, trigger=b"/r")
    assert seeded_plan(3, 20, trigger=b"/r") != seeded_plan(4, 20, trigger=b"/r")
    without_trigger = seeded_plan(3, 50, fault_rate=1.0)
    assert {f.kind for f in without_trigger.faults if f} <= {"drop", "delay", "blackhole"}
    assert FaultPlan((None, Fault(kind="delay"))).for_connection(5) is None
    with pytest.raises(ConfigError, match="needs a trigger"):
        Fault(kind="cut")
    with pytest.raises(ConfigError, match="fault kind"):
        Fault(kind="melt")
    with pytest.raises(ConfigError, match="fault_rate"):
        seeded_plan(1, 1, fault_rate=2.0)


def ledger(accepted: dict[str, str], count: int, weight: float) -> RoundLedger:
    tasks = {"t1": "a", "t2": "b"}
    return RoundLedger(round=1, status="completed", tasks=tasks, accepted=accepted, count=count, total_weight=weight)


def test_the_verdict_finds_lost_and_double_counted_updates() -> None:
    examples = {"a": 10, "b": 30}
    good = check_exactly_once([ledger({"t1": "a/t1/1", "t2": "b/t2/3"}, 2, 40.0)], examples)
    assert good.ok and good.resent_accepted == 1 and good.issued == good.accepted == 2
    lost = check_exactly_once([ledger({"t1": "a/t1/1"}, 1, 10.0)], examples)
    assert lost.lost == ("round 1 task t2 (b)",) and not lost.ok
    twice = check_exactly_once([ledger({"t1": "a/t1/1", "t2": "b/t2/1"}, 2, 50.0)], examples)
    assert twice.counted_twice == 1 and not twice.ok  # a's 10 examples folded in twice


def test_the_crash_hook_is_read_from_the_environment_and_fires_after_a_results_publish() -> None:
    assert crash_point_from_env({}) is None
    assert crash_point_from_env({CRASH_ENV: "after-result-publish"}) == "after-result-publish"
    with pytest.raises(ConfigError, match=CRASH_ENV):
        crash_point_from_env({CRASH_ENV: "sometimes"})
    fired: list[str] = []
    broker = InMemoryBroker()
    hooked = CrashingTransport(
        InMemoryTransport(broker, "dev"), "p/devices/dev/results", crash=lambda: fired.append("x")
    )
    hooked.start()
    hooked.publish("p/devices/dev/status", b"s")
    assert fired == []
    hooked.publish("p/devices/dev/results", b"u")
    assert fired == ["x"]
    hooked.close()
