"""Config and command-line inputs that broke a run (issue 16): each is refused by load_config / check
with an error naming the key and the fix, and the CLI exits 2 with one message, no traceback."""

from __future__ import annotations

from pathlib import Path

import pytest

from cluster.cli import main
from cluster.config import ConfigError, load_config

DEMO = Path(__file__).resolve().parents[2] / "configs" / "demo.yaml"


@pytest.mark.parametrize(
    ("override", "fragment"),
    [
        # overrides that are not valid YAML (were yaml.ParserError / ReaderError tracebacks)
        ("steps=[", r"override 'steps=\[': the value '\[' is not valid YAML"),
        ("steps={", r"override 'steps=\{': the value '\{' is not valid YAML"),
        ("steps=: x", r"override 'steps=: x': the value ': x' is not valid YAML"),
        ("steps=\x07", r"not valid YAML"),  # a control character: yaml.ReaderError
        ("steps=@x", r"not valid YAML"),
        ("a..b=1", r"must look like key\.path=value"),
        ("=1", r"must look like key\.path=value"),
        ("steps.x=1", r"'steps' is a value, not a section"),
        # floats must be finite
        ("learner.learning_rate=.inf", r"'learner.learning_rate': Input should be a finite number"),
        ("rollout.sampling.temperature=.inf", r"'rollout.sampling.temperature': Input should be a finite"),
        ("learner.max_grad_norm=.inf", r"'learner.max_grad_norm': Input should be a finite number"),
        ("learner.loss.tis_cap=.nan", r"'learner.loss.tis_cap': Input should be a finite number"),
        ("rewards.terms=[{function: format, weight: .inf}]", r"'rewards.terms.0.weight'.*finite"),
        ("learner.lora.alpha=-.inf", r"'learner.lora.alpha'"),
        # sizes and timeouts have upper bounds
        ("rollout.kv_cache_mb=9223372036854775808", r"'rollout.kv_cache_mb': Input should be less than"),
        ("rewards.timeout_s=1e308", r"'rewards.timeout_s': Input should be less than or equal to 604800"),
        ("rewards.batch_timeout_s=1.0e300", r"'rewards.batch_timeout_s': Input should be less than"),
        ("rollout.max_model_len=99999999999", r"'rollout.max_model_len': Input should be less than"),
        ("steps=1e400", r"'steps'"),
        ("seed=-1", r"'seed': Input should be greater than or equal to 0"),
        ("rollout.sampling.top_k=0", r"top_k = 0 keeps no token"),
        # names and templates
        ("model=''", r"'model': .*is empty"),
        ("model='  '", r"'model': .*is empty"),
        ("data.user_template='{q}'", r"'data.user_template'.*\{question\}"),
        ("data.user_template='Solve it.'", r"has no \{question\} placeholder"),
        ("data.user_template='{question'", r"not a valid template"),
        ("data.user_template='{0}{question}'", r"not a valid template"),
        ("name=../../x", r"'name': .*one plain directory name"),
        ("name=''", r"'name': .*one plain directory name"),
        ("name=.", r"'name'"),
        ("name=..", r"'name'"),
        ("name=a/b", r"'name'"),
        ("name=/abs", r"'name'"),
        ("run_root=''", r"'run_root'"),
        ("data.train_files=['']", r"a data file path is empty"),
        ("data.question_field=''", r"'data.question_field'"),
        ("learner.lora.target_modules=['q proj']", r"not module names"),
    ],
)
def test_bad_override_is_a_config_error(override: str, fragment: str) -> None:
    with pytest.raises(ConfigError, match=fragment):
        load_config(DEMO, [override])


def test_good_template_and_name_still_load() -> None:
    cfg = load_config(DEMO, ["data.user_template='Q: {question} {{braces}}'", "name=run-2.b_c"])
    assert cfg.data.user_template.format(question="x") == "Q: x {braces}"
    assert cfg.run_dir.name == "run-2.b_c"


def test_non_utf8_config_file_is_named(tmp_path: Path) -> None:
    bad = tmp_path / "latin1.yaml"
    bad.write_bytes(DEMO.read_bytes() + b"# caf\xe9\n")
    with pytest.raises(ConfigError, match=r"latin1\.yaml' is not UTF-8"):
        load_config(bad)
    with pytest.raises(ConfigError, match="cannot be read"):
        load_config(tmp_path)  # a directory


def test_cli_prints_one_line_and_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check", str(DEMO), "steps=["]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: override 'steps=['") and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


def test_check_refuses_max_model_len_beyond_the_model(capsys: pytest.CaptureFixture[str]) -> None:
    # The shipped tiny model has max_position_embeddings 128; vLLM would refuse 512 inside an actor.
    code = main(["check", str(DEMO), "rollout.max_model_len=512", "data.max_prompt_tokens=200"])
    err = capsys.readouterr().err
    assert code == 2
    assert "rollout.max_model_len = 512 exceeds the model's context length 128" in err
    assert "config ok" not in err


def test_check_refuses_tensor_parallel_not_dividing_heads(capsys: pytest.CaptureFixture[str]) -> None:
    # The tiny model has 2 attention heads.
    assert main(["check", str(DEMO), "rollout.tensor_parallel_size=3"]) == 2
    assert "does not divide the model's 2 attention heads" in capsys.readouterr().err


def test_check_refuses_top_k_beyond_the_vocabulary(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check", str(DEMO), "rollout.sampling.top_k=1000"]) == 2
    assert "top_k = 1000 exceeds the model's vocabulary of 320 tokens" in capsys.readouterr().err


def test_rope_factor_stretches_the_context() -> None:
    from cluster.planning.model_limits import context_limit

    assert context_limit({"max_position_embeddings": 4096}) == 4096
    yarn = {"max_position_embeddings": 32768, "rope_scaling": {"rope_type": "yarn", "factor": 4.0}}
    assert context_limit(yarn) == 131072
    assert context_limit({"max_position_embeddings": 128, "rope_parameters": {"rope_type": "default"}}) == 128


def test_train_refuses_max_model_len_before_starting_anything(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(
        [
            "train",
            str(DEMO),
            "rollout.max_model_len=512",
            "data.max_prompt_tokens=200",
            f"run_root={tmp_path}",
        ]
    )
    assert code == 2
    assert "rollout.max_model_len = 512 exceeds the model's context length 128" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []  # refused before the run directory (or any actor) existed
