"""The admission policy, pure: time is passed in, no event loop."""

from __future__ import annotations

from slotproxy.admission import Admission, Backoff, Decision, Limits, State, Ticket
from slotproxy.config import ClassConfig


def make(slots: int | None = 2, queue: int = 10, connecting: int = 100,
         unseen: int | None = None) -> Admission:
    return Admission(Limits(max_slots=slots, max_queue=queue, max_connecting=connecting,
                            max_unseen=unseen), backoff=Backoff(first=1.0, cap=4.0))


def arrive(adm: Admission, n: int, now: float = 0.0) -> list[Ticket]:
    tickets = [Ticket(info=i) for i in range(n)]
    for t in tickets:
        adm.arrive(t, now)
    return tickets


def test_admits_up_to_the_limit_then_queues_in_order() -> None:
    adm = make(slots=2)
    a, b, c, d = arrive(adm, 4)
    assert [t.state for t in (a, b, c, d)] == [State.HOLDING, State.HOLDING, State.WAITING, State.WAITING]
    assert list(adm.waiters()) == [c, d]
    assert adm.release(a, 1.0) == [c]
    assert adm.release(b, 2.0) == [d]
    assert adm.holders == {c, d} and adm.waiting == 0


def test_queue_full_refuses_the_next_one() -> None:
    adm = make(slots=1, queue=2)
    arrive(adm, 3)
    late = Ticket()
    assert adm.arrive(late, 0.0) is Decision.QUEUE_FULL
    assert late.state is State.DONE and adm.waiting == 2


def test_max_queue_zero_refuses_as_soon_as_slots_are_full() -> None:
    adm = make(slots=1, queue=0)
    assert adm.arrive(Ticket(), 0.0) is Decision.ADMITTED
    assert adm.arrive(Ticket(), 0.0) is Decision.QUEUE_FULL


def test_a_waiter_that_leaves_never_takes_a_slot() -> None:
    adm = make(slots=1)
    holder, quitter, patient = arrive(adm, 3)
    adm.leave(quitter)
    assert quitter.state is State.DONE and adm.waiting == 1
    assert adm.release(holder, 1.0) == [patient]
    assert quitter not in adm.holders


def test_newcomer_does_not_jump_the_queue() -> None:
    adm = make(slots=1)
    holder, _waiter = arrive(adm, 2)
    adm.release(holder, 1.0)  # the waiter is admitted
    newcomer = Ticket()
    assert adm.arrive(newcomer, 1.0) is Decision.QUEUED


def test_server_refusal_puts_the_client_back_in_front_and_backs_off() -> None:
    adm = make(slots=3)
    a, b, c, d = arrive(adm, 4)  # a, b, c hold; d waits
    adm.refused(b, now=10.0)
    adm.refused(a, now=10.0)  # refused together: counted once
    assert adm.failures == 1 and adm.blocked_until == 11.0
    assert list(adm.waiters()) == [a, b, d]  # a and b keep their places, ahead of d
    assert adm.release(c, 10.5) == [a]  # our own session ended: a real slot, probe at once
    assert adm.probe is a
    assert adm.answered(a, 10.6) == [b, d]  # the probe got in: admission reopens
    assert adm.failures == 0 and not adm.blocked


def test_backoff_doubles_up_to_the_cap_and_probes_one_at_a_time() -> None:
    adm = make(slots=3)
    a, b = arrive(adm, 2)
    adm.refused(a, 0.0)
    adm.refused(b, 0.0)
    delays = []
    now = 0.0
    for _ in range(5):
        assert adm.unblock(now) == []  # too early
        now = adm.blocked_until
        admitted = adm.unblock(now)
        assert admitted == [a] and adm.probe is a  # only the first in line probes
        adm.refused(a, now)
        delays.append(adm.blocked_until - now)
    assert delays == [2.0, 4.0, 4.0, 4.0, 4.0]


def test_probe_that_hangs_up_hands_the_probe_on() -> None:
    adm = make(slots=3)
    a, b = arrive(adm, 2)
    adm.refused(a, 0.0)
    adm.refused(b, 0.0)
    assert adm.unblock(1.0) == [a]
    assert adm.release(a, 1.1) == [b]  # a's client left while connecting
    assert adm.probe is b


def test_raising_the_limit_admits_waiters_at_once() -> None:
    adm = make(slots=1)
    _, b, c = arrive(adm, 3)
    assert adm.update(Limits(max_slots=3, max_queue=10), 1.0) == [b, c]


def test_lowering_the_limit_ends_nobody() -> None:
    adm = make(slots=3)
    a, b, c, d = arrive(adm, 4)
    adm.update(Limits(max_slots=1, max_queue=10), 1.0)
    assert adm.holders == {a, b, c}
    assert adm.release(a, 2.0) == [] and adm.release(b, 2.0) == []
    assert adm.release(c, 2.0) == [d]


def test_drain_empties_the_queue_in_order() -> None:
    adm = make(slots=1)
    holder, b, c = arrive(adm, 3)
    assert adm.drain() == [b, c]
    assert adm.waiting == 0 and adm.holders == {holder}


def test_no_cap_admits_everyone_it_may_start() -> None:
    adm = make(slots=None, connecting=3)
    tickets = arrive(adm, 5)
    assert len(adm.holders) == 3 and adm.waiting == 2  # only startups in flight are limited
    for t in tickets[:3]:
        adm.answered(t, 1.0)
    assert adm.holders == set(tickets) and adm.waiting == 0


def test_startups_in_flight_are_limited() -> None:
    adm = make(slots=10, connecting=2)
    a, b, c, d = arrive(adm, 4)
    assert adm.connecting == {a, b} and list(adm.waiters()) == [c, d]
    assert adm.answered(a, 1.0) == [c]  # a's server answered: c may start
    adm.refused(b, 1.0)  # b's refused: it waits in front, admission blocks
    assert adm.connecting == {c} and list(adm.waiters()) == [b, d]
    assert adm.peak_connecting == 2


def test_unseen_sessions_are_limited_until_a_poll_shows_them() -> None:
    adm = make(slots=10, unseen=2)
    a, b, c, d = arrive(adm, 4)
    for t in (a, b):
        adm.answered(t, 0.5)
    assert adm.holders == {a, b}  # c and d wait: peers cannot see a and b yet
    assert adm.update(adm.limits, 1.0, seen=[a, b], viewing=True) == [c, d]
    assert adm.unseen == {c, d}


def test_with_a_view_a_refusal_blocks_until_the_next_poll() -> None:
    adm = make(slots=5)
    adm.update(adm.limits, 0.0, seen=[], viewing=True)
    a, b = arrive(adm, 2)
    adm.refused(a, 1.0)
    adm.refused(b, 1.0)
    assert adm.unblock(1000.0) == []  # no timer ends it: only a poll does
    assert adm.update(adm.limits, 2.0, seen=[]) == [a]  # the poll lifts it; a probes
    assert adm.answered(a, 2.1) == [b]


def test_losing_the_view_turns_the_block_into_a_backoff() -> None:
    adm = make(slots=5)
    adm.update(adm.limits, 0.0, seen=[], viewing=True)
    [a] = arrive(adm, 1)
    adm.refused(a, 1.0)
    adm.update(adm.limits, 3.0, viewing=False)
    assert adm.blocked_until == 4.0  # the first backoff step from now
    assert adm.unblock(4.0) == [a]


# -- classes: lanes sharing one server ------------------------------------------------------


def lanes(slots: int, *classes: ClassConfig) -> Admission:
    return Admission(Limits(max_slots=slots, max_queue=100, max_connecting=100), classes)


def flood(adm: Admission, lane: str, n: int) -> list[Ticket]:
    tickets = [Ticket(lane=lane) for _ in range(n)]
    for t in tickets:
        adm.arrive(t, 0.0)
    return tickets


def held(adm: Admission) -> dict[str, int]:
    return {name: len(lane.holders) for name, lane in adm.lanes.items()}


def churn(adm: Admission, rounds: int) -> dict[str, float]:
    """Release the oldest holder again and again; the average slots each lane held."""
    totals = dict.fromkeys(adm.lanes, 0)
    for i in range(rounds):
        oldest = min(adm.holders, key=lambda t: t.admitted_at)
        adm.release(oldest, float(i + 1))
        for t in list(adm.holders):
            adm.answered(t, float(i + 1))
        flood(adm, oldest.lane, 1)  # a flooding lane never runs dry
        for name, n in held(adm).items():
            totals[name] += n
    return {name: total / rounds for name, total in totals.items()}


def test_weights_share_the_slots() -> None:
    adm = lanes(6, ClassConfig("web", weight=3), ClassConfig("cron", weight=1), ClassConfig("default"))
    flood(adm, "cron", 20)
    flood(adm, "web", 20)
    shares = churn(adm, 300)
    assert abs(shares["web"] - 4.5) <= 1 and abs(shares["cron"] - 1.5) <= 1, shares


def test_min_slots_come_first_while_the_class_waits() -> None:
    adm = lanes(6, ClassConfig("batch", weight=100), ClassConfig("ops", min_slots=2), ClassConfig("default"))
    flood(adm, "batch", 6)  # takes everything while ops has nobody waiting
    assert held(adm)["batch"] == 6
    flood(adm, "ops", 3)
    shares = churn(adm, 50)
    assert shares["ops"] >= 1.9, shares  # back to two as soon as batch's slots turn over


def test_max_slots_caps_a_class_and_others_use_the_rest() -> None:
    adm = lanes(4, ClassConfig("cron", max_slots=1), ClassConfig("default"))
    flood(adm, "cron", 5)
    assert held(adm) == {"cron": 1, "default": 0}
    [web] = flood(adm, "default", 1)
    assert web.state is State.HOLDING, "a capped class does not hold up the others"


def test_each_class_has_its_own_queue_limit() -> None:
    adm = lanes(1, ClassConfig("cron", max_queue=1), ClassConfig("default"))
    flood(adm, "default", 1)  # takes the slot
    assert adm.arrive(Ticket(lane="cron"), 0.0) is Decision.QUEUED
    assert adm.arrive(Ticket(lane="cron"), 0.0) is Decision.QUEUE_FULL
    assert adm.arrive(Ticket(lane="default"), 0.0) is Decision.QUEUED


def test_fifo_within_a_class_and_ties_go_to_the_oldest_waiter() -> None:
    adm = lanes(1, ClassConfig("a"), ClassConfig("default"))
    [holder] = flood(adm, "a", 1)
    first_b, first_a, second_a = Ticket(lane="default"), Ticket(lane="a"), Ticket(lane="a")
    for t in (first_b, first_a, second_a):
        adm.arrive(t, 0.0)
    assert adm.release(holder, 1.0) == [first_b]  # 0/1 for both lanes: the oldest waiter wins
    assert adm.release(first_b, 2.0) == [first_a]
    assert list(adm.waiters()) == [second_a]


# -- which idle holders ending would let a waiter in -----------------------------------------


def test_reclaim_ends_one_holder_per_waiter_and_none_while_paused() -> None:
    adm = make(slots=3)
    holders = arrive(adm, 3)
    arrive(adm, 2)  # waiting for a full server
    assert adm.reclaimable(holders) == holders[:2]
    assert adm.reclaimable(holders[1:], ending=holders[:1]) == holders[1:2], \
        "a holder already ending counts for one waiter"
    adm.pause()
    assert adm.reclaimable(holders) == [], "while paused, ending sessions admits nobody"


def test_reclaim_nothing_when_waiters_wait_for_something_else() -> None:
    adm = make(slots=3, connecting=1)
    holder = arrive(adm, 3)[0]  # one startup in flight: the others wait for it
    assert len(adm.holders) == 1 and adm.waiting == 2
    assert adm.reclaimable([holder]) == [], "a free server slot already waits for them"


def test_reclaim_for_a_class_at_its_max_slots_ends_only_its_own_sessions() -> None:
    adm = lanes(4, ClassConfig("cron", max_slots=1), ClassConfig("default"))
    [cron] = flood(adm, "cron", 1)
    web = flood(adm, "default", 1)
    flood(adm, "cron", 1)  # waits: its class is full, the server is not
    assert adm.reclaimable([*web, cron]) == [cron]


def test_holders_no_poll_can_show_do_not_hold_up_the_unseen_limit() -> None:
    adm = make(slots=10, unseen=1)
    hidden = Ticket(showable=False)  # TLS passthrough: the monitor may never match it
    adm.arrive(hidden, 0.0)
    [shown] = arrive(adm, 1)
    assert hidden.state is State.HOLDING and shown.state is State.HOLDING
    [held_up] = arrive(adm, 1)
    assert held_up.state is State.WAITING, "one unseen showable holder fills max_unseen = 1"
