"""The per-pool build queue: first come first served, at most `limit` builds per pool, and who is next."""

from __future__ import annotations

import pytest

from llmengine.reconcile.queue import BuildQueue


def test_positions_are_first_come_first_served_within_the_free_slots() -> None:
    q = BuildQueue(limit=2)
    active = {"ns/run-1"}
    assert q.position("h100", "ns/a", active) == 0  # one slot free
    assert q.position("h100", "ns/b", active) == 1
    assert q.position("h100", "ns/c", active) == 2
    assert q.position("a100", "ns/z", active) == 0  # another pool's line is its own
    assert q.position("h100", "ns/run-1", active) == 0  # a running build keeps its slot
    assert q.head("h100") == ["ns/a", "ns/b"]
    q.started("h100", "ns/a")
    assert q.head("h100") == ["ns/b", "ns/c"]
    q.forget("ns/b")
    assert q.head("h100") == ["ns/c"] and q.depth("h100") == 1


def test_a_build_being_created_holds_its_slot_until_its_job_is_listed() -> None:
    q = BuildQueue(limit=2)
    running = {"ns/run-1"}
    assert q.position("h100", "ns/a", running) == 0
    q.reserve("h100", "ns/a")  # its Job is being created...
    q.started("h100", "ns/a")
    # ...and a Job list read before the create went through does not show it: the slot is still taken.
    assert q.position("h100", "ns/b", running) == 1
    assert q.position("h100", "ns/a", running) == 0  # its own next pass still may (re)create it
    # Once the list shows it, the reservation is the Job itself; when a build ends, the next one goes.
    assert q.position("h100", "ns/b", running | {"ns/a"}, listed=running | {"ns/a"}) == 1
    assert q.position("h100", "ns/b", {"ns/a"}, listed={"ns/a", "ns/run-1"}) == 0


def test_a_build_that_ended_before_any_list_saw_it_running_frees_its_slot() -> None:
    q = BuildQueue(limit=1)
    assert q.position("h100", "ns/a", set()) == 0
    q.reserve("h100", "ns/a")
    q.started("h100", "ns/a")
    assert q.position("h100", "ns/b", set()) == 1  # not listed yet: a's slot is held
    # The first list that shows a's Job shows it ended (it failed within seconds): the slot is free at once,
    # not when the reservation runs out.
    assert q.position("h100", "ns/b", set(), listed={"ns/a"}) == 0


def test_next_in_line_names_the_engines_whose_builds_lead_their_pool() -> None:
    q = BuildQueue(limit=1)
    for eng, pool, key in [
        (("ns", "first"), "h100", "ns/llme-build-1"),
        (("ns", "twin"), "h100", "ns/llme-build-1"),  # same identity: one build, both wait on it
        (("ns", "second"), "h100", "ns/llme-build-2"),
        (("other", "x"), "a100", "other/llme-build-3"),
    ]:
        q.join(eng, pool, key)
        q.position(pool, key, active={"ns/running"} if pool == "h100" else set())
    assert q.next_in_line("h100") == [("ns", "first"), ("ns", "twin")]
    assert q.next_in_line("a100") == [("other", "x")]
    q.leave(("ns", "first"))  # deleting one engine keeps the place of the build its twin still waits on
    assert q.next_in_line("h100") == [("ns", "twin")]
    q.join(("ns", "twin"), "h100", "ns/llme-build-4")  # its identity moved: the build nobody wants leaves
    assert q.next_in_line("h100") == [("ns", "second")]


def test_one_claim_per_identity_until_it_goes_stale(monkeypatch: pytest.MonkeyPatch) -> None:
    from llmengine.reconcile import queue as q

    now = [100.0]
    monkeypatch.setattr(q.time, "monotonic", lambda: now[0])
    line = q.BuildQueue(2)
    assert line.claim("llme-build-x|store", "ns-a/llme-build-x") is None
    assert line.claim("llme-build-x|store", "ns-b/llme-build-x") == "ns-a/llme-build-x"
    assert line.claim("llme-build-x|store", "ns-a/llme-build-x") is None  # the holder renews
    assert line.claim("llme-build-x|other-store", "ns-b/llme-build-x") is None  # another store: another build
    now[0] += q.RESERVATION_SECONDS + 1
    assert line.claim("llme-build-x|store", "ns-b/llme-build-x") is None  # the holder went quiet
