"""flowcore.util.multiprocessing.Pool against the standard library's
multiprocessing.Pool on the same inputs."""
from __future__ import annotations

import multiprocessing
import os
import pytest

import flowcore
from flowcore.testing import Signal
from flowcore.util.multiprocessing import Pool, TimeoutError

pytestmark = pytest.mark.timeout(120)


def wait_on(sig):
    return sig.wait(60)


def square(x):
    return x * x


def add(a, b):
    return a + b


def collatz_steps(n):
    steps = 0
    while n != 1:
        n = n // 2 if n % 2 == 0 else 3 * n + 1
        steps += 1
    return steps


def fail_on(x, bad=3):
    if x == bad:
        raise ValueError(f"bad item {x}")
    return x


def pid_and_init(_):
    return os.getpid(), os.environ.get("POOL_INIT_MARK")


def set_mark(value):
    os.environ["POOL_INIT_MARK"] = value


class Unpicklable(Exception):
    def __reduce__(self):
        raise TypeError("cannot pickle this error")


def raise_unpicklable(_):
    raise Unpicklable("x")


@pytest.fixture(scope="module")
def pools(tmp_path_factory):
    flowcore.shutdown()
    # 4 CPUs: the module's Pool(2) holds two (each pool process is a 1-CPU
    # actor, as in Ray) while the tests' own pools take the others
    flowcore.init(num_cpus=4, object_store_memory=128 << 20,
                  session_dir=str(tmp_path_factory.mktemp("mp")))
    std = multiprocessing.get_context("spawn").Pool(2)
    ours = Pool(2)
    yield std, ours
    std.terminate()
    std.join()
    ours.terminate()
    flowcore.shutdown()


def test_standard_library_examples(pools):
    std, ours = pools
    for pool in (std, ours):
        assert pool.map(square, range(10)) == [x * x for x in range(10)]
        assert sorted(pool.imap_unordered(square, range(10))) == [x * x for x in range(10)]
        assert list(pool.imap(square, range(10))) == [x * x for x in range(10)]
        assert pool.apply_async(square, (20,)).get(timeout=30) == 400
        assert pool.apply(add, (2,), {"b": 5}) == 7
        assert pool.starmap(add, [(1, 2), (3, 4)]) == [3, 7]
        sig = Signal()
        r = pool.apply_async(wait_on, (sig,))
        with pytest.raises(TimeoutError):
            r.get(timeout=0.1)
        assert not r.ready()
        with pytest.raises(ValueError):
            r.successful()
        sig.set()
        assert r.get(timeout=60) is True and r.successful()
        sig.close()


def test_cpu_bound_map_and_chunksizes_match(pools):
    std, ours = pools
    data = list(range(1, 3000))
    expected = std.map(collatz_steps, data)
    assert ours.map(collatz_steps, data) == expected
    assert ours.map(collatz_steps, data, chunksize=7) == expected
    assert list(ours.imap(collatz_steps, data, chunksize=50)) == expected
    assert sorted(ours.imap_unordered(collatz_steps, data, chunksize=50)) == sorted(expected)
    assert ours.starmap(add, zip(data, data), chunksize=100) == std.starmap(add, zip(data, data))
    got = []
    res = ours.map_async(square, range(5), callback=got.append)
    assert res.get(30) == [0, 1, 4, 9, 16] and res.successful()
    assert got == [[0, 1, 4, 9, 16]]
    assert ours.map(square, []) == std.map(square, []) == []


def test_exceptions_propagate_like_the_standard_library(pools):
    std, ours = pools
    for pool in (std, ours):
        with pytest.raises(ValueError, match="bad item 3") as ei:
            pool.map(fail_on, range(6), chunksize=1)
        assert type(ei.value) is ValueError
        assert "fail_on" in str(ei.value.__cause__)  # the remote traceback
        with pytest.raises(ValueError, match="bad item 3"):
            pool.apply(fail_on, (3,))
        errors = []
        r = pool.map_async(fail_on, range(6), error_callback=errors.append)
        r.wait(30)
        assert r.ready() and not r.successful()
        assert [type(e) for e in errors] == [ValueError]
        it = pool.imap(fail_on, range(6))
        assert [next(it) for _ in range(3)] == [0, 1, 2]
        with pytest.raises(ValueError):
            next(it)
        assert next(it) == 4  # one-item chunks: iteration goes on after the error
        with pytest.raises(multiprocessing.pool.MaybeEncodingError):
            pool.apply(raise_unpicklable, (1,))
        with pytest.raises(ValueError, match="Chunksize"):
            pool.imap(square, range(3), chunksize=0)


def test_initializer_maxtasksperchild_and_life_cycle(pools):
    with Pool(processes=1, initializer=set_mark, initargs=("ok",),
              maxtasksperchild=2) as pool:
        out = pool.map(pid_and_init, range(6), chunksize=1)
    assert {mark for _, mark in out} == {"ok"}
    # one worker at a time, replaced after every two chunks
    assert len({pid for pid, _ in out}) == 3
    pool = Pool(1)
    r = pool.map_async(square, range(4))
    pool.close()
    with pytest.raises(ValueError, match="not running"):
        pool.map(square, [1])
    pool.join()
    assert r.get(0) == [0, 1, 4, 9]
    running = Pool(1)
    with pytest.raises(ValueError, match="still running"):
        running.join()
    running.terminate()
    with pytest.raises(ValueError, match="at least 1"):
        Pool(0)
    with pytest.raises(NotImplementedError):
        import pickle
        pickle.dumps(running)


def die_once(marker, x):
    if x == 2 and not os.path.exists(marker):
        with open(marker, "w"):
            pass
        os._exit(1)
    return x


def test_a_chunk_whose_worker_died_runs_again(pools, tmp_path):
    marker = str(tmp_path / "died")
    with Pool(2) as pool:
        assert pool.starmap(die_once, [(marker, i) for i in range(5)], chunksize=1) == \
            list(range(5))
    assert os.path.exists(marker)


def broken_input():
    yield 1
    yield 2
    raise KeyError("input broke")


def test_imap_reads_its_input_lazily_and_raises_its_errors(pools):
    std, ours = pools
    for pool in (std, ours):
        got = []
        with pytest.raises(KeyError, match="input broke"):
            for y in pool.imap(square, broken_input()):
                got.append(y)
        assert got == [1, 4]
    consumed = []

    def numbers():
        for i in range(10**6):
            consumed.append(i)
            yield i

    with Pool(2) as pool:
        first = []
        for y in pool.imap(square, numbers()):
            first.append(y)
            if len(first) == 5:
                break
        assert first == [0, 1, 4, 9, 16]
        # the dropped iterator's input is not read further: later work runs
        # (it would otherwise wait behind a million items), and reads none of it
        assert list(pool.imap(square, [])) == []
        stopped_at = len(consumed)
        assert stopped_at < 10**6
        assert list(pool.imap(square, range(3))) == [0, 1, 4]
        assert len(consumed) == stopped_at


def bad_initializer():
    raise RuntimeError("cannot set up")


def test_a_pool_whose_workers_cannot_start_fails_its_work(pools):
    # (the standard library's pool would restart such workers forever)
    with Pool(1, initializer=bad_initializer) as pool:
        with pytest.raises(Exception, match="cannot set up"):
            pool.map(square, range(3), chunksize=1)


def test_a_dropped_pool_ends_its_workers(pools):
    import gc
    import time

    def alive_workers():
        return sum(1 for a in flowcore.state.list_actors()
                   if a["class_name"] == "PoolActor" and a["state"] == "ALIVE")

    before = alive_workers()
    pool = Pool(1)
    assert pool.map(square, range(4)) == [0, 1, 4, 9]
    assert alive_workers() == before + 1
    del pool  # neither closed nor terminated: collected, its __del__ ends the worker
    gc.collect()
    deadline = time.monotonic() + 30  # the kill is asynchronous: poll for its effect
    while alive_workers() != before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert alive_workers() == before
