"""`ray job submit` end to end: a local Ray head with token auth, the README's submit command, the demo.

The head is started by this test (`ray start --head --block` as a child process in its own session,
temp dir, ports and auth token) and stopped by that handle in a finally block: SIGTERM to the
`ray start` process, which tears down the Ray processes it started, then SIGKILL to whatever it
spawned that is still running. Never `ray stop` (it stops every Ray instance of the user, including
the session's `ray_session` cluster) and never by process name.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

import pytest

from cluster.telemetry.metrics import read_metrics

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent  # the venv running the tests; the head and its jobs use it too
JOB_TIMEOUT_S = 600
HEAD_START_TIMEOUT_S = 180


@dataclass
class Head:
    address: str  # the job API, http://127.0.0.1:<dashboard port>
    env: dict[str, str]  # what every `ray` CLI call against this head runs with (token included)
    log: Path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _ray(head: Head, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BIN / "ray"), *args], env=head.env, capture_output=True, text=True, timeout=timeout, cwd=ROOT
    )


def _get(url: str, token: str | None) -> int:
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return exc.code
    except OSError:  # not listening yet (URLError is an OSError)
        return 0


def _stop(head: subprocess.Popen[bytes]) -> None:
    """Stop this head and everything it started, through its own process handle."""
    import psutil

    try:
        spawned = psutil.Process(head.pid).children(recursive=True)  # GCS, raylet, dashboard, workers, job
    except psutil.NoSuchProcess:
        spawned = []
    if head.poll() is None:
        head.send_signal(signal.SIGTERM)  # `ray start --block` kills the processes it started, then exits
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            head.kill()
            head.wait(timeout=10)
    _, alive = psutil.wait_procs(spawned, timeout=30)
    for proc in alive:  # psutil checks each is still the process we listed (pid + start time)
        with suppress(psutil.NoSuchProcess):
            proc.kill()
    psutil.wait_procs(alive, timeout=10)
    if alive:
        print(f"killed {len(alive)} leftover process(es) of the test head: {[p.pid for p in alive]}")


@contextmanager
def local_head(tmp_path: Path) -> Iterator[Head]:
    # A short temp dir of its own: Ray's unix socket paths under it must stay under 107 bytes.
    ray_tmp = Path(tempfile.mkdtemp(prefix="grpo-rj-", dir="/tmp"))
    token = secrets.token_hex(32)
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}  # no RAY_ADDRESS etc. leaking in
    env.update(
        RAY_AUTH_MODE="token",
        RAY_AUTH_TOKEN=token,  # this head's token, for the head, the jobs and the CLI; ~/.ray is untouched
        RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="0",  # SIGTERM stops at once instead of draining for 30 s
        RAY_USAGE_STATS_ENABLED="0",
        PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}",  # `python` in the job entrypoint is the venv's
    )
    dashboard_port = _free_port()
    log = tmp_path / "ray-head.log"
    command = [
        str(BIN / "ray"),
        "start",
        "--head",
        "--block",
        f"--port={_free_port()}",
        f"--ray-client-server-port={_free_port()}",
        f"--dashboard-agent-listen-port={_free_port()}",
        "--num-cpus=2",
        "--num-gpus=0",
        "--object-store-memory=500000000",
        "--include-dashboard=true",
        "--dashboard-host=127.0.0.1",
        f"--dashboard-port={dashboard_port}",
        f"--temp-dir={ray_tmp}",
        "--disable-usage-stats",
    ]
    with log.open("wb") as out:
        head = subprocess.Popen(
            command, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    ok = False
    try:
        address = f"http://127.0.0.1:{dashboard_port}"
        deadline = time.monotonic() + HEAD_START_TIMEOUT_S
        while _get(f"{address}/api/version", token) != 200:
            if head.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"the Ray head did not come up:\n{log.read_text()[-4000:]}")
            time.sleep(1)
        # Token auth is on: the job API refuses a request without the token.
        assert _get(f"{address}/api/jobs/", None) == 401
        yield Head(address, env, log)
        ok = True
    finally:
        _stop(head)
        if ok:
            shutil.rmtree(ray_tmp, ignore_errors=True)
        else:
            print(f"the test head's Ray logs are kept in {ray_tmp}")


def _submit(head: Head, submission_id: str, entrypoint: list[str], timeout: float) -> str:
    """The README's command; blocks until the job ends; returns its full logs."""
    runtime_env = subprocess.run(
        [str(BIN / "python"), "-m", "cluster.cli", "job", "runtime-env"],
        env=head.env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    args = ["job", "submit", "--address", head.address, "--submission-id", submission_id]
    try:
        submitted = _ray(head, *args, "--runtime-env-json", runtime_env, "--", *entrypoint, timeout=timeout)
    except subprocess.TimeoutExpired:
        _ray(head, "job", "stop", "--address", head.address, submission_id)
        raise
    logs = _ray(head, "job", "logs", "--address", head.address, submission_id).stdout
    status = _ray(head, "job", "status", "--address", head.address, submission_id)
    # `ray job status` prints "Job '<id>' succeeded" for SUCCEEDED only (STOPPED/FAILED read differently).
    assert submitted.returncode == 0 and f"Job '{submission_id}' succeeded" in status.stdout, (
        f"job {submission_id}: {status.stdout}{status.stderr}\n--- job logs ---\n{logs[-6000:]}"
        f"\n--- submit ---\n{submitted.stderr[-3000:]}"
    )
    return logs


def test_ray_job_submit_runs_the_demo(tmp_path: Path, tiny_model: Path) -> None:
    run_root = tmp_path / "runs"  # absolute and outside the uploaded working_dir: the test reads it
    t0 = time.perf_counter()
    with local_head(tmp_path) as head:
        t_head = time.perf_counter() - t0
        # The job runs from the uploaded copy of the checkout (not this tree), with the venv's python,
        # and the credentials named in cluster.job.FORWARDED_ENV arrive by name.
        head.env["WANDB_MODE"] = "disabled"
        probe = (
            "import cluster, json, os, sys; print('PROBE', json.dumps("
            "[cluster.__file__, os.getcwd(), sys.executable, os.environ.get('WANDB_MODE')]))"
        )
        logs = _submit(head, f"probe-{secrets.token_hex(4)}", ["python", "-c", probe], 300)
        package, cwd, python, wandb_mode = json.loads(logs.split("PROBE ", 1)[1].splitlines()[0])
        assert Path(package).is_relative_to(cwd) and not Path(cwd).is_relative_to(ROOT), (package, cwd)
        assert Path(python).parent == BIN and wandb_mode == "disabled"
        t_probe = time.perf_counter() - t0 - t_head

        entrypoint = ["python", "-m", "cluster.cli", "train", "configs/demo.yaml", "steps=2"]
        entrypoint += ["data.eval_max_prompts=8", "logging.progress_bar=false"]
        entrypoint += [f"run_root={run_root}", "name=job", "ray_address=auto"]
        logs = _submit(head, f"demo-{secrets.token_hex(4)}", entrypoint, JOB_TIMEOUT_S)
        t_job = time.perf_counter() - t0 - t_head - t_probe
    print(
        f"head up {t_head:.0f} s, probe job {t_probe:.0f} s, demo job {t_job:.0f} s, "
        f"total with stop {time.perf_counter() - t0:.0f} s"
    )
    print("\n".join(line for line in logs.splitlines() if "held-out" in line or "actors ready" in line))
    assert "held-out accuracy:" in logs
    run_dir = run_root / "job"
    steps = {record["step"] for record in read_metrics(run_dir).records}
    assert {1, 2} <= steps, steps
    assert (run_dir / "adapter").is_dir()
