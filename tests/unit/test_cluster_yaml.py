"""cluster/cluster.yaml, cluster/cluster-local.yaml and cluster/job.py, checked offline.

The autoscaler configs go through Ray's own preparation and schema validation (what `ray up` runs
before it talks to a cloud), then the security properties are asserted: token auth on every
`ray start`, the dashboard on 127.0.0.1 only, the auth token shipped to every node.
"""

from __future__ import annotations

import copy
import ipaddress
import json
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from cluster import job
from cluster.cli import main as cli_main

ROOT = Path(__file__).resolve().parents[2]
CLUSTER_YAML = ROOT / "cluster" / "cluster.yaml"
LOCAL_YAML = ROOT / "cluster" / "cluster-local.yaml"
RUNTIME_ENV_YAML = ROOT / "cluster" / "runtime_env.yaml"
CONFIGS = [CLUSTER_YAML, LOCAL_YAML]


def _load(path: Path) -> dict[str, Any]:
    return yaml.safe_load(path.read_text())


def _prepared(path: Path) -> dict[str, Any]:
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = prepare_config(copy.deepcopy(_load(path)))
    validate_config(config)
    return config


def _commands(config: dict[str, Any]) -> list[str]:
    keys = (
        "initialization_commands",
        "setup_commands",
        "head_setup_commands",
        "worker_setup_commands",
        "head_start_ray_commands",
        "worker_start_ray_commands",
    )
    return [cmd for key in keys for cmd in config.get(key) or []]


def _start_commands(config: dict[str, Any]) -> list[str]:
    return [
        cmd
        for key in ("head_start_ray_commands", "worker_start_ray_commands")
        for cmd in config[key]
        if "ray start" in cmd
    ]


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_ray_accepts_the_config(path: Path) -> None:
    config = _prepared(path)
    assert config["cluster_name"] == "grpo-ray"
    assert config["head_node_type"] in config["available_node_types"]


def test_validation_has_teeth() -> None:
    from jsonschema import ValidationError
    from ray.autoscaler._private.util import prepare_config, validate_config

    broken = _load(CLUSTER_YAML)
    broken["available_node_types"]["rollout"]["max_wrokers"] = 8  # a typo must not pass silently
    with pytest.raises(ValidationError):
        validate_config(prepare_config(broken))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_token_auth_on_every_ray_start(path: Path) -> None:
    config = _load(path)
    starts = _start_commands(config)
    assert sum("--head" in cmd for cmd in starts) == 1
    assert sum("--address=$RAY_HEAD_IP:6379" in cmd for cmd in starts) == 1
    for cmd in starts:
        assert "RAY_AUTH_MODE=token" in cmd, cmd
    # Every node and client needs the same token: the submitter's ~/.ray/auth_token goes everywhere.
    assert config["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_dashboard_listens_on_loopback_only(path: Path) -> None:
    config = _load(path)
    head = [cmd for cmd in _start_commands(config) if "--head" in cmd]
    assert len(head) == 1 and "--dashboard-host=127.0.0.1" in head[0].split()
    for cmd in _commands(config):
        assert "0.0.0.0" not in cmd, cmd
        assert set(re.findall(r"--dashboard-host[= ](\S+)", cmd)) <= {"127.0.0.1"}, cmd


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_commands_are_valid_bash(path: Path) -> None:
    for cmd in _commands(_load(path)):
        result = subprocess.run(["bash", "-n", "-c", cmd], capture_output=True, text=True)
        assert result.returncode == 0, f"{cmd}\n{result.stderr}"


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_nodes_install_the_gpu_stack_from_the_checkout(path: Path) -> None:
    config = _load(path)
    assert config["file_mounts"]["~/grpo-ray"] == "."
    assert ".venv" in config["rsync_exclude"]
    assert any("GRPO_RAY_GPU=1 scripts/setup.sh" in cmd for cmd in config["setup_commands"])


def test_aws_node_types() -> None:
    config = _prepared(CLUSTER_YAML)
    assert config["provider"]["type"] == "aws"
    assert "IpPermissions" not in config["provider"].get("security_group", {}), "only SSH may be open"
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0
    learner, rollout = types["learner"], types["rollout"]
    assert learner["resources"]["learner"] == 1 and learner["resources"]["GPU"] >= 1
    assert learner["min_workers"] == learner["max_workers"] == 1
    assert rollout["resources"]["rollout"] == 1 and rollout["resources"]["GPU"] >= 1
    assert rollout["min_workers"] == 0 and rollout["max_workers"] >= 1
    workers = sum(t["max_workers"] for name, t in types.items() if name != config["head_node_type"])
    assert config["max_workers"] >= workers, "the global max_workers would cap rollout scaling"


def test_local_cluster_roles_by_ip() -> None:
    config = _load(LOCAL_YAML)
    provider = config["provider"]
    assert provider["type"] == "local"
    docs = ipaddress.ip_network("192.0.2.0/24")  # RFC 5737 documentation range: placeholders only
    assert all(ipaddress.ip_address(ip) in docs for ip in [provider["head_ip"], *provider["worker_ips"]])
    (worker_start,) = [c for c in _start_commands(config) if "--head" not in c]
    assert '--resources="{\\"$ROLE\\": 1}"' in worker_start
    case = re.search(r"case .*? esac", worker_start)
    assert case is not None

    def role(ips: str) -> str:
        script = f'hostname() {{ echo "{ips} "; }}; {case.group(0)}; echo "$ROLE"'
        return subprocess.run(
            ["bash", "-c", script], capture_output=True, text=True, check=True
        ).stdout.strip()

    learner_ip, *rollout_ips = provider["worker_ips"]
    assert role(f"10.1.2.3 {learner_ip}") == "learner"
    assert [role(ip) for ip in rollout_ips] == ["rollout"] * len(rollout_ips)
    assert role(learner_ip + "1") == "rollout"  # 192.0.2.111 is not 192.0.2.11


# cluster/job.py


def test_runtime_env_shape_and_forwarding(tmp_path: Path) -> None:
    environ = {"WANDB_API_KEY": "k", "HF_TOKEN": "t", "WANDB_MODE": "", "AWS_SECRET_ACCESS_KEY": "no"}
    env = job.runtime_env(tmp_path, environ)
    assert env == {
        "working_dir": str(tmp_path.resolve()),
        "excludes": list(job.RUNTIME_ENV_EXCLUDES),
        "env_vars": {"WANDB_API_KEY": "k", "HF_TOKEN": "t"},  # set ones only, and only those named
    }
    json.dumps(env)


def test_runtime_env_yaml_matches_the_module() -> None:
    env = _load(RUNTIME_ENV_YAML)
    assert env["working_dir"] == "."
    assert env["excludes"] == list(job.RUNTIME_ENV_EXCLUDES)
    assert "env_vars" not in env  # credentials are forwarded by name from the shell, never stored


def test_upload_walk_matches_ray(tmp_path: Path) -> None:
    from ray._private.runtime_env.packaging import _dir_travel, _get_excludes

    for rel in ["a.py", "runs/x/metrics.jsonl", "pkg/__pycache__/m.pyc", "pkg/m.py", "x.egg-info/PKG"]:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text("x")
    (tmp_path / "pkg" / ".gitignore").write_text("*.log\n")
    (tmp_path / "pkg" / "debug.log").write_text("x")
    (tmp_path / ".rayignore").write_text("secret/\n")
    (tmp_path / "secret").mkdir()
    (tmp_path / "secret" / "k").write_text("x")
    ours = {str(rel) for rel, _ in job.upload_files(tmp_path)}
    rays: set[str] = set()

    def add(p: Path) -> None:
        if p.is_file():
            rays.add(str(p.relative_to(tmp_path)))

    _dir_travel(
        tmp_path, [_get_excludes(tmp_path, list(job.RUNTIME_ENV_EXCLUDES))], add, include_gitignore=True
    )
    assert ours == rays == {"a.py", "pkg/m.py", "pkg/.gitignore", ".rayignore"}


def test_check_upload_size(tmp_path: Path) -> None:
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "big.bin").write_bytes(b"\0" * 3 * 2**20)
    (tmp_path / "model.safetensors").write_bytes(b"\0" * 2 * 2**20)
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "ckpt.bin").write_bytes(b"\0" * 50 * 2**20)  # excluded: never counted
    (tmp_path / "train.py").write_text("print()")
    job.check_upload_size(tmp_path, limit_bytes=6 * 2**20)
    with pytest.raises(ValueError) as info:
        job.check_upload_size(tmp_path, limit_bytes=4 * 2**20)
    message = str(info.value)
    assert "5.0 MiB" in message and "4.0 MiB limit" in message
    assert message.index("data/") < message.index("model.safetensors") < message.index("train.py")
    assert "3.0 MiB" in message and "runs" not in message.split("Largest paths:")[1].split("Fix:")[0]
    assert ".rayignore" in message


def test_repository_fits_and_cli_prints_json(capsys: pytest.CaptureFixture[str]) -> None:
    job.check_upload_size(ROOT)
    assert cli_main(["job", "runtime-env", "--working-dir", str(ROOT)]) == 0
    env = json.loads(capsys.readouterr().out)
    assert env["working_dir"] == str(ROOT) and env["excludes"] == list(job.RUNTIME_ENV_EXCLUDES)


def test_cli_refuses_a_non_checkout(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["job", "runtime-env", "--working-dir", str(tmp_path)]) == 2
    assert "not a grpo-ray checkout" in capsys.readouterr().err
