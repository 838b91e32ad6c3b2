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
