"""flowcore.util.ActorPool with Ray's API, on a real local cluster."""
from __future__ import annotations

import pytest

import flowcore
from flowcore.exceptions import GetTimeoutError
from flowcore.testing import Signal
from flowcore.util import ActorPool

pytestmark = pytest.mark.timeout(60)


@flowcore.remote(num_cpus=0)
class Doubler:
    def double(self, v):
        return 2 * v

    def gated(self, item):
        sig, v = item
        if sig is not None:
            sig.wait()
        return v

    def pair(self, v):
        return v, -v

    def fail(self, v):
        raise ValueError(f"bad {v}")


@pytest.fixture(scope="module")
def actors(cluster):
    return [Doubler.remote() for _ in range(2)]


def test_map_in_order_and_unordered(actors):
    pool = ActorPool(actors)
    assert list(pool.map(lambda a, v: a.double.remote(v), range(7))) == [0, 2, 4, 6, 8, 10, 12]
    out = sorted(pool.map_unordered(lambda a, v: a.double.remote(v), [1, 2, 3, 4]))
    assert out == [2, 4, 6, 8]
    assert not pool.has_next() and pool.has_free()


def test_unordered_returns_what_is_ready_first(actors):
    pool = ActorPool(actors)
    sig = Signal()
    pool.submit(lambda a, v: a.gated.remote(v), (sig, "slow"))
    pool.submit(lambda a, v: a.gated.remote(v), (None, "fast"))
    assert pool.get_next_unordered(timeout=30) == "fast"
    with pytest.raises(TimeoutError):  # GetTimeoutError is also a TimeoutError
        pool.get_next_unordered(timeout=0.2)
    assert pool.has_next()
    sig.set()
    assert pool.get_next_unordered() == "slow"
    with pytest.raises(StopIteration):
        pool.get_next_unordered()


def test_submit_queues_when_every_actor_is_busy(actors):
    pool = ActorPool(actors)
    sig = Signal()
    for i in range(5):
        pool.submit(lambda a, v: a.gated.remote(v), (sig, i))
    assert not pool.has_free() and pool.pop_idle() is None
    with pytest.raises(GetTimeoutError):
        pool.get_next(timeout=0.2)
    sig.set()
    assert [pool.get_next(timeout=30) for _ in range(5)] == [0, 1, 2, 3, 4]
    assert not pool.has_next()
    with pytest.raises(StopIteration):
        pool.get_next()


def test_get_next_timeout_can_skip_a_submission(actors):
    pool = ActorPool(actors)
    sig = Signal()
    pool.submit(lambda a, v: a.gated.remote(v), (sig, "stuck"))
    pool.submit(lambda a, v: a.gated.remote(v), (None, "next"))
    with pytest.raises(TimeoutError, match="skipped"):
        pool.get_next(timeout=0.2, ignore_if_timedout=True)
    assert pool.get_next(timeout=30) == "next"
    assert not pool.has_next()
    sig.set()


def test_mixing_unordered_then_ordered_is_refused(actors):
    pool = ActorPool(actors)
    sig = Signal()
    pool.submit(lambda a, v: a.gated.remote(v), (sig, 0))
    pool.submit(lambda a, v: a.gated.remote(v), (None, 1))
    assert pool.get_next_unordered(timeout=30) == 1
    with pytest.raises(ValueError, match="get_next_unordered"):
        pool.get_next()
    sig.set()
    assert pool.get_next_unordered(timeout=30) == 0


def test_push_pop_idle_errors_and_multiple_returns(actors):
    pool = ActorPool([actors[0]])
    assert pool.has_free()
    a = pool.pop_idle()
    assert a == actors[0] and pool.pop_idle() is None and not pool.has_free()
    pool.push(a)
    with pytest.raises(ValueError, match="already belongs"):
        pool.push(a)
    pool.push(actors[1])
    assert list(pool.map(lambda a, v: a.pair.options(num_returns=2).remote(v), [3])) == [[3, -3]]
    pool.submit(lambda a, v: a.fail.remote(v), 7)
    with pytest.raises(ValueError, match="bad 7"):
        pool.get_next()
    assert pool.has_free()  # the actor came back even though its call failed
    with pytest.raises(TypeError, match="ObjectRef"):
        pool.submit(lambda a, v: v, 1)
    assert pool.has_free()


def test_map_drops_results_left_unfetched(actors):
    pool = ActorPool(actors)
    pool.submit(lambda a, v: a.double.remote(v), 100)
    assert list(pool.map(lambda a, v: a.double.remote(v), [1, 2])) == [2, 4]
    assert flowcore.util.ActorPool is ActorPool and flowcore.ActorPool is ActorPool
