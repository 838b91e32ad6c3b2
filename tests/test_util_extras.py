"""flowcore.util and its bridges import without the optional extras; a
missing extra is an ImportError that names it."""
from __future__ import annotations

import subprocess
import sys

import pytest

pytestmark = pytest.mark.timeout(60)

PROBE = """
import sys
for name in ("dask", "joblib", "sklearn", "pandas"):
    sys.modules[name] = None  # as if not installed
import flowcore.util, flowcore.util.queue, flowcore.util.multiprocessing, flowcore.job_submission
for mod, extra in (("flowcore.util.dask", "flowcore[dask]"), ("flowcore.util.joblib", "flowcore[sklearn]")):
    try:
        __import__(mod)
    except ImportError as e:
        assert extra in str(e), str(e)
    else:
        raise AssertionError(mod + " imported without its extra")
print("ok")
"""


def test_bridges_import_without_their_extras():
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


RAY_PATHS = """
import flowcore
# Ray's import paths, spelled with flowcore (a program switches by its imports)
import flowcore.util.placement_group
from flowcore.util import placement_group, remove_placement_group, get_current_placement_group
from flowcore.util.placement_group import PlacementGroup, placement_group_table
from flowcore.util.scheduling_strategies import (NodeAffinitySchedulingStrategy,
                                                 PlacementGroupSchedulingStrategy)
assert flowcore.util.placement_group is flowcore.placement_group  # the function, as in Ray
assert NodeAffinitySchedulingStrategy is flowcore.NodeAffinitySchedulingStrategy
flowcore.init(num_cpus=2)
try:
    node = flowcore.get_runtime_context().get_node_id()
    f = flowcore.remote(lambda: flowcore.get_runtime_context().get_node_id())
    assert flowcore.get(f.options(scheduling_strategy=NodeAffinitySchedulingStrategy(
        node, soft=False)).remote(), timeout=60) == node
    pg = placement_group([{"CPU": 1}])
    assert isinstance(pg, PlacementGroup)
    flowcore.get(pg.ready(), timeout=60)
    g = flowcore.remote(lambda: get_current_placement_group() is not None)
    assert flowcore.get(g.options(scheduling_strategy=PlacementGroupSchedulingStrategy(
        pg, placement_group_capture_child_tasks=True)).remote(), timeout=60)
    assert placement_group_table(pg)["state"] == "CREATED"
    remove_placement_group(pg)
finally:
    flowcore.shutdown()
print("ok")
"""


def test_rays_util_import_paths_work():
    out = subprocess.run([sys.executable, "-c", RAY_PATHS], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().endswith("ok"), out.stdout
