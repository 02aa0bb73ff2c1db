"""routeproxy.callids: allocation, both-way lookup, release, exhaustion, the status snapshot."""
import json
import time

from hypothesis import settings, strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule, run_state_machine_as_test
from twisted.trial.unittest import SynchronousTestCase

from routeproxy.callids import CallIDExhausted, CallIDSpace


class CallIDSpaceTests(SynchronousTestCase):
    def test_unique_never_zero(self):
        space = CallIDSpace("lrp")
        ids = [space.allocate(("session", n)) for n in range(20000)]
        self.assertEqual(len(set(ids)), len(ids))
        self.assertNotIn(0, ids)
        self.assertTrue(all(1 <= i <= 0xFFFF for i in ids))
        self.assertEqual(len(space), 20000)

    def test_walks_forward_from_start_and_wraps(self):
        space = CallIDSpace(start=65534)
        self.assertEqual([space.allocate(n) for n in range(4)], [65534, 65535, 1, 2])

    def test_random_start(self):
        """Two fresh spaces (two daemon restarts) almost never start at the same ID."""
        starts = {CallIDSpace().allocate("x") for _ in range(20)}
        self.assertGreater(len(starts), 1)

    def test_exhaustion_at_65535(self):
        space = CallIDSpace("rrp 192.0.2.20")
        self.assertEqual(space.capacity, 65535)
        started = time.monotonic()
        ids = {space.allocate(n) for n in range(65535)}
        elapsed = time.monotonic() - started
        self.assertEqual(ids, set(range(1, 65536)))
        e = self.assertRaises(CallIDExhausted, space.allocate, "one too many")
        self.assertEqual(e.scope, "rrp 192.0.2.20")
        self.assertIn("rrp 192.0.2.20", str(e))
        self.assertIn("65535", str(e))
        self.assertLess(elapsed, 5.0)
        # A release makes room again, and exactly that ID comes back.
        owner = space.owner_of(4242)
        self.assertIsNotNone(owner)
        self.assertEqual(space.release(4242), owner)
        self.assertEqual(space.allocate("late"), 4242)
        self.assertRaises(CallIDExhausted, space.allocate, "again")

    def test_release_and_reuse(self):
        space = CallIDSpace(first=1, last=3, start=1)
        a, b, c = (space.allocate(o) for o in "abc")
        self.assertEqual(space.release(b), "b")
        self.assertEqual(space.owner_of(b), None)
        self.assertEqual(space.id_of("b"), None)
        self.assertEqual(space.allocate("d"), b)
        self.assertEqual(space.owner_of(b), "d")

    def test_release_is_idempotent(self):
        space = CallIDSpace()
        i = space.allocate("a")
        self.assertEqual(space.release(i), "a")
        self.assertIsNone(space.release(i))
        self.assertIsNone(space.release(0))
        self.assertEqual(len(space), 0)

    def test_no_immediate_reuse(self):
        space = CallIDSpace(first=1, last=10, start=5)
        held = [space.allocate(n) for n in range(5)]
        space.release(held[2])
        newer = [space.allocate(n) for n in range(5, 10)]  # the five never-used IDs come first
        self.assertNotIn(held[2], newer)
        self.assertEqual(space.allocate(10), held[2])  # only now, as the last free ID
        # Among released IDs, the oldest release comes back first.
        space.release(newer[0])
        space.release(held[0])
        self.assertEqual([space.allocate("x"), space.allocate("y")], [newer[0], held[0]])

    def test_allocation_cost_is_flat_when_nearly_full(self):
        """Release+allocate with one free ID costs no more than with the space empty."""
        def churn(space, n=20000):
            i = space.allocate("churn")
            started = time.perf_counter()
            for _ in range(n):
                space.release(i)
                i = space.allocate("churn")
            return time.perf_counter() - started

        empty = CallIDSpace()
        full = CallIDSpace()
        for n in range(65534):
            full.allocate(n)
        self.assertLess(churn(full), 5 * churn(empty) + 0.05)

    def test_both_way_lookup(self):
        space = CallIDSpace()
        owners = [("session", 3, c) for c in (256, 57982, 1)]
        ids = [space.allocate(o) for o in owners]
        for owner, i in zip(owners, ids):
            self.assertEqual(space.owner_of(i), owner)
            self.assertEqual(space.id_of(owner), i)
            self.assertIn(i, space)
        self.assertIsNone(space.id_of(("session", 4, 256)))
        self.assertEqual(space.release_owner(owners[1]), ids[1])
        self.assertIsNone(space.release_owner(owners[1]))
        self.assertEqual(sorted(dict(space)), sorted([ids[0], ids[2]]))

    def test_owner_holds_one_id(self):
        space = CallIDSpace("s")
        space.allocate("a")
        e = self.assertRaises(ValueError, space.allocate, "a")
        self.assertIn("already holds", str(e))
        self.assertEqual(len(space), 1)

    def test_bad_ranges(self):
        for kwargs in [dict(first=0), dict(last=65536), dict(first=5, last=4), dict(first=1, last=9, start=10)]:
            self.assertRaises(ValueError, CallIDSpace, **kwargs)

    def test_snapshot(self):
        space = CallIDSpace("LRP", first=1, last=10)
        self.assertEqual(space.snapshot(), {"scope": "LRP", "in_use": 0, "capacity": 10})
        a = space.allocate("a")
        space.allocate("b")
        space.release(a)
        snap = space.snapshot()
        self.assertEqual(snap, {"scope": "LRP", "in_use": 1, "capacity": 10})
        self.assertEqual(json.loads(json.dumps(snap)), snap)  # plain data only


class SpaceMachine(RuleBasedStateMachine):
    """A CallIDSpace over IDs 1..6 against a plain dict model."""

    FIRST, LAST = 1, 6

    def __init__(self):
        super().__init__()
        self.space = CallIDSpace("model", first=self.FIRST, last=self.LAST, start=3)
        self.model = {}  # id -> owner
        self.last_released = None
        self.next_owner = 0

    def free_count(self):
        return self.LAST - self.FIRST + 1 - len(self.model)

    @rule()
    def allocate(self):
        owner = ("owner", self.next_owner)
        self.next_owner += 1
        if self.free_count() == 0:
            try:
                self.space.allocate(owner)
            except CallIDExhausted:
                return
            raise AssertionError("allocated from a full space")
        call_id = self.space.allocate(owner)
        assert self.FIRST <= call_id <= self.LAST
        assert call_id not in self.model, call_id
        if self.free_count() > 1:
            assert call_id != self.last_released, "just-released ID reused while others were free"
        self.model[call_id] = owner

    @precondition(lambda self: self.model)
    @rule(data=st.data())
    def release(self, data):
        call_id = data.draw(st.sampled_from(sorted(self.model)))
        assert self.space.release(call_id) == self.model.pop(call_id)
        self.last_released = call_id

    @rule(call_id=st.integers(0, 8))
    def release_unknown_or_known(self, call_id):
        expected = self.model.pop(call_id) if call_id in self.model else None
        assert self.space.release(call_id) == expected
        if expected is not None:
            self.last_released = call_id

    @invariant()
    def lookups_agree(self):
        assert len(self.space) == len(self.model)
        for call_id in range(self.FIRST - 1, self.LAST + 2):
            owner = self.model.get(call_id)
            assert self.space.owner_of(call_id) == owner
            if owner is not None:
                assert self.space.id_of(owner) == call_id


class ModelTests(SynchronousTestCase):
    def test_against_model(self):
        run_state_machine_as_test(SpaceMachine, settings=settings(max_examples=150, stateful_step_count=60,
                                                                   deadline=None))
