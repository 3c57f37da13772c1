"""RewardsConfig validation and the function registry (no worker processes)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from rewards import RewardConfigError, RewardError, RewardsConfig, RewardTerm
from rewards.builtin import BUILTINS, resolve

REPO = Path(__file__).resolve().parents[2]


def _config(**term: Any) -> RewardsConfig:
    return RewardsConfig.model_validate({"terms": [term]})


def test_defaults() -> None:
    cfg = _config(function="numeric_match")
    assert (cfg.timeout_s, cfg.max_masked_fraction, cfg.num_workers) == (5.0, 0.5, 1)
    assert cfg.terms[0].label == "numeric_match"
    assert RewardTerm(function="format", name="fmt").label == "fmt"


def test_every_field_is_documented() -> None:
    for model in (RewardsConfig, RewardTerm):
        for name, info in model.model_fields.items():
            assert info.description, f"{model.__name__}.{name} has no description"


def test_unknown_builtin_suggests_the_close_one() -> None:
    with pytest.raises(ValidationError, match="did you mean 'numeric_match'"):
        _config(function="numeric_macth")


@pytest.mark.parametrize(
    "function", ["mypkg.rewards:", ":score", "mypkg rewards:score", "a:b:c", "1pkg:score"]
)
def test_malformed_import_path(function: str) -> None:
    with pytest.raises(ValidationError, match=r"package\.module:function"):
        _config(function=function)


def test_user_module_is_not_imported_at_config_time() -> None:
    cfg = _config(function="surely_not_a_module_xyz.rewards:score")
    assert "surely_not_a_module_xyz" not in sys.modules
    assert cfg.terms[0].function == "surely_not_a_module_xyz.rewards:score"


@pytest.mark.parametrize(
    ("term", "message"),
    [
        ({"function": "numeric_match", "kwargs": {"tolerance": 0.1}}, "accepts: rel_tol=0.0"),
        ({"function": "length_penalty", "kwargs": {"soft_limit": 100}}, "hard_limit"),
        (
            {"function": "length_penalty", "kwargs": {"soft_limit": 200, "hard_limit": 100}},
            "soft_limit < hard_limit",
        ),
        (
            {"function": "length_penalty", "kwargs": {"soft_limit": 1, "hard_limit": 2, "unit": "words"}},
            "unit",
        ),
        ({"function": "format", "kwargs": {"pattern": "(unclosed"}}, "not a valid regular expression"),
        ({"function": "math_verify", "kwargs": {"timeout_seconds": 2.5}}, "positive integer"),
        ({"function": "format", "wieght": 2.0}, "Extra inputs are not permitted"),
        ({"function": "format", "weight": float("nan")}, "finite"),
    ],
)
def test_bad_term(term: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        RewardsConfig.model_validate({"terms": [term]})


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"terms": []}, "at least 1"),
        ({"timeout_s": 0}, "greater than 0"),
        ({"max_masked_fraction": 1.5}, "less than or equal to 1"),
        ({"num_workers": 0}, "greater than or equal to 1"),
        ({"terms": [{"function": "format"}, {"function": "format", "weight": 0.5}]}, "distinct names"),
    ],
)
def test_bad_limits(fields: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        RewardsConfig.model_validate({"terms": [{"function": "format"}], **fields})


def test_two_terms_of_one_function_with_names() -> None:
    cfg = RewardsConfig(
        terms=[RewardTerm(function="format"), RewardTerm(function="format", name="format2", weight=0.5)]
    )
    assert [t.label for t in cfg.terms] == ["format", "format2"]


def test_config_imports_without_torch_or_sympy() -> None:
    code = (
        "import sys, rewards; bad = {'torch', 'sympy', 'math_verify'} & set(sys.modules); assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)


# --------------------------------------------------------------------------------------------------
# resolve
# --------------------------------------------------------------------------------------------------


def test_resolve_builtin_and_import_path() -> None:
    assert resolve("numeric_match") is BUILTINS["numeric_match"]
    assert resolve("os.path:join") is __import__("os").path.join


def test_resolve_missing_module() -> None:
    with pytest.raises(RewardConfigError) as err:
        resolve("mypkg.rewards:score")
    assert str(err.value) == (
        "reward 'mypkg.rewards:score': module 'mypkg.rewards' not found — is it importable from the "
        "working directory / installed?"
    )
    assert isinstance(err.value, RewardError)


def test_resolve_missing_attribute_suggests() -> None:
    with pytest.raises(RewardConfigError, match="has no attribute 'joni'; did you mean 'join'"):
        resolve("os.path:joni")


def test_resolve_not_callable() -> None:
    with pytest.raises(RewardConfigError, match="not a function"):
        resolve("os:sep")


def test_resolve_module_with_a_missing_dependency(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "needs_dep_xyz.py").write_text(
        "import not_installed_dep_xyz\n\ndef score(c, r):\n    return []\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(
        RewardConfigError, match=r"importing module 'needs_dep_xyz' failed.*not_installed_dep_xyz"
    ):
        resolve("needs_dep_xyz:score")


def test_correctness_verdicts_are_registered_builtins() -> None:
    from rewards.builtin import VERDICTS, check_correctness_name

    assert set(VERDICTS) <= set(BUILTINS) and "format" not in VERDICTS  # shaping terms are not verdicts
    check_correctness_name("my_task.checks:is_right")
    with pytest.raises(RewardConfigError, match="did you mean 'numeric_match'"):
        check_correctness_name("numeric_matc")
