"""The run's console (issue 16): library chatter the user cannot act on goes only to RUN_DIR/console.log;
the plan, progress, results, errors and tracebacks stay on the console."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from cluster.telemetry.console import is_chatter, quiet_console

ACTOR = "\x1b[36m(RolloutWorker pid=4242)\x1b[0m "  # how Ray prefixes a line forwarded from an actor

CHATTER = [
    # seen on the demo's console (issue 16)
    "/x/torch/distributed/distributed_c10d.py:552: FutureWarning: `torch.distributed.reduce_op` is deprecated",
    "  warnings.warn(",
    ACTOR + "/x/torch/distributed/c10d.py:552: FutureWarning: `torch.distributed.reduce_op` is deprecated",
    ACTOR
    + "WARNING 12-01 20:36:19 [importing.py:45] Triton is installed, but doesn't include CPU backend. Disabling Triton.",
    ACTOR
    + "INFO 12-01 20:36:20 [cpu_worker.py:80] auto thread-binding list (id, physical core): [(0, 0)] NUMA node 0",
    ACTOR
    + "[repeated 3x across cluster] (Ray deduplicates logs by default. Set RAY_DEDUP_LOGS=0 to disable)",
    "2026-12-01 20:36:21,000\tINFO worker.py:2038 -- Started a local Ray instance.",
    ACTOR + "[2026-12-01 20:36:19,196 W 11856 11856] gcs_client.cc:210: retrying",
    ACTOR + "INFO:vllm.engine:engine started",
    # seen on a live 2-step demo run here (RUN_DIR/console.log)
    ACTOR + "Triton is installed, but doesn't include CPU backend. Disabling Triton.",
    ACTOR + "[W1201 21:00:28.359467409 utils.cpp:68] Warning: NUMA binding: Using MEMBIND policy for memory",
    ACTOR + "\rLoading safetensors checkpoint shards: 100% Completed | 1/1 [00:00<00:00, 23.91it/s]",
    "\x1b[36m(Learner pid=26723)\x1b[0m \rLoading weights:  10%|\u2588         | 4/39 [00:00<00:02, 15.17it/s]",
    "\x1b[36m(Learner pid=26723)\x1b[0m Failed to load CPU gemm_4bit_forward from kernels-community: No module",
    "Failed to load CPU gemm_4bit_forward from kernels-community: No module named 'kernels'.",
    ACTOR,  # an empty forwarded line
]
KEPT = [
    "grpo-ray plan for 'demo' (model assets/tiny-qwen2)",
    "train prompts: 7800 from train.jsonl (0 longer than 48 tokens dropped, 0 bad rows skipped)",
    "held-out accuracy: 0.210 -> 0.480 (wall time 300 s)",
    ACTOR + "ERROR 12-01 20:36:19 [core.py:1] EngineCore failed to start.",
    ACTOR + "Traceback (most recent call last):",
    ACTOR + "ValueError: max_model_len 512 is larger than the model's 128",
    "error: reward 'myrewards.bad:one_value' could not score 9 of 16 samples",
    ACTOR + "[2026-12-01 20:36:19,196 E 11856 11856] raylet.cc:1: worker died",
    ACTOR + "[E1201 21:00:28.359467409 utils.cpp:68] CPU allocation failed",
    ACTOR + '  File "/x/rollout/engine.py", line 12, in generate',  # an indented traceback line
    "2026-12-01 20:58:55,342\tWARNING authentication_token_setup.py:85 -- Token authentication is enabled",
]


@pytest.mark.parametrize("line", CHATTER)
def test_chatter_is_recognised(line: str) -> None:
    assert is_chatter(line)


@pytest.mark.parametrize("line", KEPT)
def test_what_matters_is_kept(line: str) -> None:
    assert not is_chatter(line)


def test_quiet_console_logs_everything_and_shows_what_matters(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    log = tmp_path / "run" / "console.log"
    with quiet_console(log):
        for line in CHATTER[2:]:
            print(line, file=sys.stderr)  # as Ray's log thread prints forwarded actor lines
        for line in KEPT:
            print(line)
            print(CHATTER[-4])  # an actor's progress bar, with its \r: hidden, and its newline too
        print(CHATTER[0], file=sys.stderr)  # a warning printed in the driver itself
        print(CHATTER[1], file=sys.stderr)
        sys.stderr.write("\rgrpo:  50%|#####     | 1/2")  # a progress bar redraw, no newline
        sys.stderr.write("\rgrpo: 100%|##########| 2/2\n")
    out, err = capsys.readouterr()
    assert out == "".join(line + "\n" for line in KEPT)  # no blank line left by a hidden one
    assert "FutureWarning" not in err and "Triton" not in err and "NUMA" not in err
    assert "\rgrpo:  50%|#####     | 1/2\rgrpo: 100%|##########| 2/2\n" in err
    assert err.endswith(f"lines of library warnings/info kept off the console: {log}\n")
    logged = log.open(newline="").read()  # keep the progress bars' \r as written
    assert all(line in logged for line in CHATTER + KEPT)


def test_a_warnings_source_line_goes_with_its_warning(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with quiet_console(tmp_path / "console.log"):
        print(ACTOR + "/x/dispatcher.py:139: FutureWarning: `torch.distributed.reduce_op` is deprecated")
        print(ACTOR + '  wrapper = lookup(vars(value).get("kernel"))')
        print(ACTOR + "Traceback (most recent call last):")
        print(ACTOR + '  File "/x/engine.py", line 3, in f')
    out, _ = capsys.readouterr()
    assert (
        out
        == ACTOR + "Traceback (most recent call last):\n" + ACTOR + '  File "/x/engine.py", line 3, in f\n'
    )
    assert sys.stdout is not None and not hasattr(sys.stdout, "buffer_text")  # streams restored
