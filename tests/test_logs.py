"""Worker output reaches the driver, prefixed with the task and pid."""
from __future__ import annotations

import pytest

import flowcore

pytestmark = pytest.mark.timeout(60)


def test_task_and_actor_output_is_forwarded(cluster, capfd):
    @flowcore.remote
    def chatty(x):
        import os
        import sys
        print(f"hello from task {x}")
        print("a warning line", file=sys.stderr)
        return os.getpid()

    pid = flowcore.get(chatty.remote(7))
    flowcore.cluster_resources()  # one more round trip: every line has landed
    out, err = capfd.readouterr()
    assert f"(test_task_and_actor_output_is_forwarded.<locals>.chatty pid={pid}) " \
           f"hello from task 7" in out
    assert f"chatty pid={pid}) a warning line" in err

    @flowcore.remote
    class Talker:
        def say(self, word):
            import os
            print(word)
            return os.getpid()
    t = Talker.remote()
    apid = flowcore.get(t.say.remote("spoken by an actor"))
    flowcore.cluster_resources()
    out, _ = capfd.readouterr()
    assert f"Talker.say pid={apid}) spoken by an actor" in out


def test_forwarding_can_be_turned_off(fresh_cluster, capfd):
    fresh_cluster(log_to_driver=False)

    @flowcore.remote
    def quiet():
        print("should not appear")
        return 1
    assert flowcore.get(quiet.remote(), timeout=30) == 1
    flowcore.cluster_resources()
    out, _ = capfd.readouterr()
    assert "should not appear" not in out
