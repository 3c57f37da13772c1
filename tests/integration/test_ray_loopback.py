"""A local run's Ray (issue 16) listens on loopback only, with token auth: the listening sockets of every
process the driver started (GCS, raylet, workers, agents) are checked on a live local Ray."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

PROBE = """
import json, os, sys, time
import psutil
import ray  # imported first, as the driver may: the loopback setting must still apply
from cluster.ray_session import init_ray

init_ray(None, num_cpus=1, _temp_dir=sys.argv[1])

@ray.remote(num_cpus=0)
class Probe:
    def pid(self):
        return os.getpid()

probe = Probe.remote()
ray.get(probe.pid.remote())
time.sleep(2)  # agents open their ports a moment after start
me = psutil.Process()
ours = {p.pid: p.name() for p in me.children(recursive=True)} | {me.pid: "driver"}
listening = sorted(
    (ours[c.pid], c.laddr.ip, c.laddr.port)
    for c in psutil.net_connections(kind="inet")
    if c.status == psutil.CONN_LISTEN and c.pid in ours
)
print(json.dumps({"listening": listening, "auth": os.environ.get("RAY_AUTH_MODE"),
                  "env_restored": "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER" not in os.environ}))
ray.shutdown()
"""


@pytest.mark.integration
def test_local_ray_listens_on_loopback_only(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_MODE")}
    env["PYTHONPATH"] = str(ROOT)
    temp_dir = Path("/tmp") / f"grpo-loopback-{os.getpid()}"  # short: Ray's unix socket paths
    done = subprocess.run(
        [sys.executable, "-c", PROBE, str(temp_dir)],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    listening = report["listening"]
    names = {name for name, _, _ in listening}
    assert {"gcs_server", "raylet"} <= names, listening  # the probe saw Ray's own processes
    exposed = [s for s in listening if s[1] not in ("127.0.0.1", "::ffff:127.0.0.1", "::1")]
    assert exposed == [], f"sockets reachable from the network: {exposed}"
    assert report["auth"] == "token" and report["env_restored"]
