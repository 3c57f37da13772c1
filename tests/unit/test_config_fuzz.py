"""Fuzz (hypothesis): any config file and any list of command-line overrides either loads or raises
ConfigError, and `grpo-ray check` either passes or exits 2 with a message; never another exception.

No model is loaded: `check` reads only the shipped tiny model's config.json. `model` overrides are
fuzzed through load_config only (a random hub id would make `check` ask the network).
"""

from __future__ import annotations

import contextlib
import io
from pathlib import Path
from typing import Any

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cluster.cli import main
from cluster.config import ConfigError, RunConfig, load_config

DEMO = Path(__file__).resolve().parents[2] / "configs" / "demo.yaml"


def _dotted_keys(model: Any, prefix: str = "") -> list[str]:
    keys = []
    for name, field in model.model_fields.items():
        keys.append(prefix + name)
        if hasattr(field.annotation, "model_fields"):
            keys.extend(_dotted_keys(field.annotation, f"{prefix}{name}."))
    return keys


KEYS = sorted({*_dotted_keys(RunConfig), "rewards.terms", "unknown", "rollout.nope", "data.x.y"})

# Values a user could type: numbers at and past every bound, non-finite floats, YAML that does not
# parse, strings with path separators and braces, nested lists and mappings.
_scalars = st.one_of(
    st.integers(min_value=-(2**70), max_value=2**70),
    st.sampled_from([0, 1, -1, 2**31, 2**63, 10**400]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.booleans(),
    st.none(),
    st.text(max_size=12),
)
_values = st.recursive(
    _scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=6), inner, max_size=3)
    ),
    max_leaves=6,
)
_raw_text = st.one_of(
    st.text(max_size=16),
    st.sampled_from(
        [
            "[",
            "{",
            ": x",
            "'",
            '"',
            "&a",
            "*a",
            "!!python/object:os.system",
            ".inf",
            "-.inf",
            ".nan",
            "{q}",
            "../..",
            "",
            "~",
            "'{question}'",
            "[{function: numeric_match}]",
            "[{function: '../x:y'}]",
        ]
    ),
)


def _render(value: Any) -> str:
    return yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()


_override = st.builds(
    lambda key, value: f"{key}={value}",
    st.one_of(st.sampled_from(KEYS), st.text(max_size=10)),
    st.one_of(_values.map(_render), _raw_text),
)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(_override, max_size=4))
def test_load_config_raises_only_config_error(overrides: list[str]) -> None:
    with contextlib.suppress(ConfigError):
        load_config(DEMO, overrides)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(_override.filter(lambda o: not o.startswith("model=")), max_size=4))
def test_check_exits_0_or_2_without_traceback(overrides: list[str]) -> None:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(["check", str(DEMO), *overrides])
    assert code in (0, 2), err.getvalue()
    assert (code == 0) == ("config ok" in out.getvalue())


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(st.sampled_from(KEYS), _values, max_size=5), st.text(max_size=40))
def test_any_config_file_loads_or_is_a_config_error(
    tmp_path_factory: Any, replaced: dict[str, Any], junk: str
) -> None:
    raw = yaml.safe_load(DEMO.read_text())
    for key, value in replaced.items():
        node = raw
        *parents, leaf = key.split(".")
        for part in parents:  # a replaced parent that is not a mapping (None, a list) becomes one
            if not isinstance(node.get(part), dict):
                node[part] = {}
            node = node[part]
        node[leaf] = value
    path = tmp_path_factory.mktemp("cfg") / "c.yaml"
    path.write_text(yaml.safe_dump(raw) + junk)
    with contextlib.suppress(ConfigError):
        load_config(path)
