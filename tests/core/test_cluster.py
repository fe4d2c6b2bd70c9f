"""The local Ray a step starts: Ray's processes get zhclip's local defaults, and a value the user set wins."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from zhclip.components.core.cluster import LOCAL_RAY_ENV

pytestmark = pytest.mark.slow

# Prints the variables as a Ray worker process sees them (Ray Train's controller is such a process).
SEEN_BY_RAY = """
import json, os, ray
from zhclip.components.core.cluster import LOCAL_RAY_ENV, ray_runtime
with ray_runtime(1):
    seen = ray.get(ray.remote(lambda names: {n: os.environ.get(n) for n in names}).remote(list(LOCAL_RAY_ENV)))
print(json.dumps(seen))
"""


def _printed_json(script: str, cwd, env: dict) -> dict:
    """What `script`, run in a new Python process with `env`, prints as JSON on its last line."""
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=cwd, capture_output=True, text=True, timeout=120, env=env
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def _seen_by_ray(tmp_path, **env) -> dict:
    base = {k: v for k, v in os.environ.items() if k not in LOCAL_RAY_ENV and k != "RAY_ADDRESS"}
    return _printed_json(SEEN_BY_RAY, tmp_path, {**base, **env})


def test_a_local_ray_gets_the_local_defaults_unless_the_user_set_them(tmp_path):
    assert _seen_by_ray(tmp_path) == LOCAL_RAY_ENV
    chosen = _seen_by_ray(tmp_path, RAY_TRAIN_HEALTH_CHECK_INTERVAL_S="5")
    assert chosen == {**LOCAL_RAY_ENV, "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "5"}


def test_a_step_starts_its_own_ray_beside_a_cluster_that_ray_start_left_on_the_machine(tmp_path):
    """`ray start` (or ray.cluster_utils) writes its address into Ray's temp folder, where a bare
    ray.init() finds and joins it, then refuses the step's num_cpus. A step without RAY_ADDRESS starts
    its own Ray whatever that file says."""
    import shutil
    import tempfile

    ray_tmp = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # short: Ray's socket paths live under it
    try:
        (Path(ray_tmp) / "ray").mkdir()
        (Path(ray_tmp) / "ray" / "ray_current_cluster").write_text("127.0.0.1:9")  # nothing listens there
        assert _seen_by_ray(tmp_path, RAY_TMPDIR=ray_tmp) == LOCAL_RAY_ENV
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)


# Holds a local Ray open until its stdin closes: the other Ray on the machine.
HOLD_A_RAY = """
import sys
from zhclip.components.core.cluster import ray_runtime
with ray_runtime(1):
    print("started", flush=True)
    sys.stdin.read()
"""

# Prints the address Ray's State API finds from inside a task (as Ray Train's placement-group cleaner
# asks it: no address given), this Ray's own GCS address, and RAY_ADDRESS in this process after start.
STATE_API_ADDRESS = """
import json, os, ray
from ray._private.services import canonicalize_bootstrap_address_or_die
from zhclip.components.core.cluster import ray_runtime
with ray_runtime(1):
    found = ray.get(ray.remote(lambda: canonicalize_bootstrap_address_or_die(None)).remote())
    own = ray.get_runtime_context().gcs_address
    driver = os.environ.get("RAY_ADDRESS")
print(json.dumps({"found": found, "own": own, "driver": driver}))
"""


def test_ray_processes_find_their_own_ray_while_another_local_ray_runs(tmp_path):
    """Two steps at once on one machine (`dvc queue start -j 2`): without its own address, the State
    API inside Ray Train's cleaner fails with "Found multiple active Ray instances" and its traceback
    reaches the step's log."""
    base = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    other = subprocess.Popen(
        [sys.executable, "-c", HOLD_A_RAY],
        cwd=tmp_path,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        env=base,
        text=True,
    )
    try:
        assert other.stdout is not None and other.stdout.readline().strip() == "started"
        seen = _printed_json(STATE_API_ADDRESS, tmp_path, base)
    finally:
        other.communicate(timeout=60)
    assert seen["found"] == seen["own"]
    assert seen["driver"] is None  # the step itself still runs in local mode
