"""flowcore.util.queue.Queue: Ray's queue API on an actor, from the driver,
tasks and actors."""
from __future__ import annotations

import asyncio

import pytest

import flowcore
from flowcore.util.queue import Empty, Full, Queue

pytestmark = pytest.mark.timeout(90)


@pytest.fixture(scope="module")
def q_cluster(tmp_path_factory):
    flowcore.shutdown()
    flowcore.init(num_cpus=2, object_store_memory=128 << 20,
                  session_dir=str(tmp_path_factory.mktemp("queue")))
    yield
    flowcore.shutdown()


def test_fifo_sizes_and_nonblocking_errors(q_cluster):
    q = Queue(maxsize=3)
    assert q.empty() and not q.full() and q.qsize() == 0 and len(q) == 0
    for i in range(3):
        q.put(i)
    assert q.full() and q.size() == 3
    with pytest.raises(Full):
        q.put_nowait(99)
    with pytest.raises(Full):
        q.put(99, timeout=0.05)
    assert [q.get() for _ in range(3)] == [0, 1, 2]
    with pytest.raises(Empty):
        q.get_nowait()
    with pytest.raises(Empty):
        q.get(block=False)
    with pytest.raises(Empty):
        q.get(timeout=0.05)
    q.shutdown()
    with pytest.raises(RuntimeError, match="shut down"):
        q.put(1)


def test_batches_are_all_or_nothing(q_cluster):
    q = Queue(maxsize=4)
    q.put_nowait_batch([1, 2, 3])
    with pytest.raises(Full, match="Cannot add 2 items"):
        q.put_nowait_batch([4, 5])
    assert q.qsize() == 3
    with pytest.raises(Empty, match="Cannot get 4 items"):
        q.get_nowait_batch(4)
    assert q.get_nowait_batch(2) == [1, 2]
    assert q.get_nowait() == 3
    with pytest.raises(TypeError):
        q.put_nowait_batch(7)
    with pytest.raises(TypeError):
        q.get_nowait_batch("2")
    with pytest.raises(ValueError):
        q.get_nowait_batch(-1)
    with pytest.raises(ValueError, match="timeout"):
        q.get(timeout=-1)
    q.shutdown(force=True)


@flowcore.remote
def producer(q, items):
    for i in items:
        q.put(i)
    return len(items)


@flowcore.remote
def consumer(q, n):
    return [q.get(timeout=60) for _ in range(n)]


@flowcore.remote
class Collector:
    def __init__(self, q):
        self.q = q

    def drain(self, n):
        return [self.q.get(timeout=60) for _ in range(n)]


def test_shared_by_tasks_actors_and_driver(q_cluster):
    q = Queue()
    # the consumer blocks on the empty queue before anything is produced
    got = consumer.remote(q, 5)
    assert flowcore.get(producer.remote(q, list(range(5)))) == 5
    assert sorted(flowcore.get(got)) == [0, 1, 2, 3, 4]
    c = Collector.remote(q)
    drained = c.drain.remote(3)
    for i in ("a", "b", "c"):
        q.put(i)
    assert flowcore.get(drained) == ["a", "b", "c"]
    # a bounded queue: the producer blocks until the driver makes room
    small = Queue(maxsize=1)
    done = producer.remote(small, [10, 11, 12])
    assert [small.get(timeout=60) for _ in range(3)] == [10, 11, 12]
    assert flowcore.get(done) == 3
    q.shutdown()
    small.shutdown()


def test_async_variants(q_cluster):
    q = Queue(maxsize=2)

    async def main():
        waiter = asyncio.ensure_future(q.get_async(timeout=60))
        await q.put_async("x")
        assert await waiter == "x"
        await q.put_async(1)
        await q.put_async(2)
        with pytest.raises(Full):
            await q.put_async(3, block=False)
        with pytest.raises(Full):
            await q.put_async(3, timeout=0.05)
        assert await q.get_async() == 1
        assert await q.get_async(block=False) == 2
        with pytest.raises(Empty):
            await q.get_async(timeout=0.05)

    asyncio.run(main())
    q.shutdown()


def test_actor_options_and_no_cpu_held(q_cluster):
    before = flowcore.available_resources().get("CPU")
    q = Queue(actor_options={"name": "shared-queue"})
    q.put("hello")
    assert flowcore.available_resources().get("CPU") == before
    same = flowcore.get_actor("shared-queue")
    assert flowcore.get(same.get.remote()) == "hello"
    q.shutdown()
    with pytest.raises(TypeError, match="maxsize"):
        Queue(maxsize="3")
