"""Built-in reward functions and the registry that turns a config's ``function`` string into a callable.

Every function follows the contract in :mod:`rewards.base`: ``fn(completions, rows, **kwargs)`` returns
one float or None per completion. Term kwargs are keyword-only parameters, so a misspelt kwarg is caught
when the config is validated (:func:`check_builtin_kwargs`), not at the first step.

Importing this module is cheap (``re``, ``fractions``); ``math_verify`` (and sympy) is imported on first
use, and by each scorer worker at start through the function's ``setup`` attribute.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import math
import re
import threading
from collections.abc import Callable, Sequence
from fractions import Fraction
from functools import lru_cache
from typing import Any

from rewards.base import RewardConfigError, RewardFn

# --------------------------------------------------------------------------------------------------
# Answer extraction and number normalisation (numeric_match)
# --------------------------------------------------------------------------------------------------

# A number as models and GSM8K write it: optional sign (ASCII or U+2212 minus), digits with optional
# 3-digit comma groups, optional decimals, optional "/denominator". Not preceded by a letter, digit,
# underscore or '.', so "x2", "v1.5" and the "5" of "10-5" (subtraction, not -5) are read sensibly.
_NUMBER_RE = re.compile(
    r"(?<![\w.])(?P<num>[-+\u2212]?(?:(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.\d+)?|\.\d+))"
    r"(?:/(?P<den>\d+)(?![\d.]))?"
)
_LATEX_FRAC_RE = re.compile(r"\\[dt]?frac\s*\{\s*([-+\u2212]?[\d.,]+)\s*\}\s*\{\s*([\d.,]+)\s*\}")
_SIGNED_CURRENCY_RE = re.compile(r"(?<![\w.])([-+\u2212])\s*\\?\$\s*(?=\d|\.\d)")  # -$5, -\$5 (LaTeX)
_ANSWER_IS_RE = re.compile(
    r"\banswer\s+(?:is|was|would\s+be|will\s+be|should\s+be)\b\s*:?|\banswer\s*[:=]", re.I
)


def last_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` (or ``\\fbox{...}``), braces balanced; None if there is none."""
    start = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    if start < 0:
        return None
    command = "\\fbox" if text.startswith("\\fbox", start) else "\\boxed"
    stripped = text[start + len(command) :].lstrip()
    if not stripped.startswith("{"):  # "\boxed 18": up to the next whitespace or '$'
        return re.split(r"[\s$]", stripped, maxsplit=1)[0]
    depth = 0
    for i, ch in enumerate(stripped):
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                return stripped[1:i]
    return stripped[1:]  # unbalanced (truncated completion): everything after the brace


def extract_answer(text: str) -> tuple[str, str] | None:
    """The span holding the model's final answer and how it was found, or None if it is not marked.

    Priority: the last ``\\boxed{}``, then the line after the last ``####``, then the rest of the
    line after the last "the answer is" / "answer:".
    """
    boxed = last_boxed(text)
    if boxed is not None:
        return boxed, "boxed"
    if "####" in text:
        return text.rsplit("####", 1)[1].strip().split("\n", 1)[0], "####"
    matches = list(_ANSWER_IS_RE.finditer(text))
    if matches:
        return text[matches[-1].end() :].strip().split("\n", 1)[0], "answer is"
    return None


def _clean(text: str) -> str:
    text = _LATEX_FRAC_RE.sub(r"\1/\2", text)
    text = text.replace("{,}", ",")  # LaTeX thousands separator: 1{,}234
    text = re.sub(r"(?<=\d)\\,(?=\d{3})", ",", text)  # thin-space thousands separator: 1\,234
    # A sign before a currency sign belongs to the number: "-$5" is -5 (as the format reward reads it).
    text = _SIGNED_CURRENCY_RE.sub(r"\1", text)
    return text.replace("\\!", "")


def _to_fraction(match: re.Match[str]) -> Fraction | None:
    value = Fraction(match.group("num").replace(",", "").replace("\u2212", "-"))
    den = match.group("den")
    if den is None:
        return value
    return value / int(den) if int(den) != 0 else None


def numbers_in(text: str) -> list[Fraction]:
    """Every number in ``text`` as an exact Fraction, in order (see ``_NUMBER_RE`` for what counts)."""
    out = [_to_fraction(m) for m in _NUMBER_RE.finditer(_clean(text))]
    return [v for v in out if v is not None]


def parse_number_answer(text: str) -> Fraction | None:
    """The final numeric answer in ``text`` (a completion or a gold string), or None.

    A marked answer (``\\boxed{}``, ``####``) is read from its span only — a marked span without a
    number is a non-answer (None). Within a span, text after the last ``=`` wins when it holds a
    number (``\\boxed{x = 5}``), then the first number in the span (``#### 18 apples``). "The answer
    is" with no number on its line, or no marker at all: the LAST number in the text.
    """
    found = extract_answer(text)
    if found is not None:
        span, how = found
        tail = span.rsplit("=", 1)[-1]
        nums = numbers_in(tail) or numbers_in(span)
        if nums:
            return nums[0]
        if how != "answer is":
            return None
    nums = numbers_in(text)
    return nums[-1] if nums else None


def _gold(row: dict[str, Any]) -> str:
    try:
        return str(row["gold"])
    except KeyError:
        raise KeyError(
            f"row has no 'gold' field (fields: {sorted(row)}); the task loader must set it"
        ) from None


def numeric_match(
    completions: list[str], rows: list[dict[str, Any]], *, rel_tol: float = 0.0
) -> list[float | None]:
    """1.0 when the completion's final number equals the gold number, else 0.0 (GSM8K-style).

    The answer is read as in :func:`parse_number_answer`: ``\\boxed{}``, then ``####``, then "the answer
    is X", else the last number. Both sides are normalised the same way: ``1,234`` and ``1{,}234`` ->
    1234, ``$``/``%``/units/trailing period ignored (only the number is read), ``-0`` == ``0``,
    ``5.0`` == ``5``, ``5.50`` == ``5.5``. Fractions ARE supported: ``1/2`` and ``\\frac{1}{2}`` equal
    ``0.5``; comparison is exact on rationals (``1/3`` != ``0.333``) unless ``rel_tol`` > 0.
    None only when the gold itself holds no number (that sample cannot be scored).
    """
    out: list[float | None] = []
    for completion, row in zip(completions, rows, strict=True):
        gold = parse_number_answer(_gold(row))
        if gold is None:
            out.append(None)
            continue
        pred = parse_number_answer(completion)
        if pred is None:
            out.append(0.0)
        elif rel_tol > 0:
            out.append(float(math.isclose(float(pred), float(gold), rel_tol=rel_tol)))
        else:
            out.append(float(pred == gold))
    return out


# --------------------------------------------------------------------------------------------------
# math_verify
# --------------------------------------------------------------------------------------------------


def _import_math_verify() -> Any:
    import math_verify  # heavy (sympy, antlr); the scorer's workers import it at start via `setup`

    return math_verify


def _gold_as_latex(gold: str) -> str:
    """Gold answers in MATH are bare LaTeX (``\\frac{1}{2}``); math_verify looks for math delimiters."""
    if "$" in gold or "\\boxed" in gold or "\\(" in gold or "\\[" in gold:
        return gold
    return f"${gold}$"


def math_verify(
    completions: list[str],
    rows: list[dict[str, Any]],
    *,
    float_rounding: int = 6,
    strict: bool = True,
    timeout_seconds: int = 5,
) -> list[float | None]:
    """1.0 when ``math_verify.verify`` finds the completion's answer equivalent to the gold, else 0.0.

    The gold is parsed as LaTeX (wrapped in ``$...$`` if it has no delimiters); None when math_verify
    extracts nothing from it. math_verify enforces its own ``timeout_seconds`` with ``signal.alarm``,
    which only works in a main thread: the scorer's workers call us there; called from any other thread
    we pass ``None`` (no internal limit) and rely on the scorer's ``rewards.timeout_s`` instead. An
    internal math_verify timeout makes that comparison False (0.0), as math_verify itself does.
    """
    mv = _import_math_verify()
    limit = timeout_seconds if threading.current_thread() is threading.main_thread() else None
    out: list[float | None] = []
    for completion, row in zip(completions, rows, strict=True):
        gold = mv.parse(_gold_as_latex(_gold(row)), parsing_timeout=limit)
        if not gold:
            out.append(None)
            continue
        pred = mv.parse(completion, parsing_timeout=limit)
        ok = bool(pred) and mv.verify(
            gold, pred, float_rounding=float_rounding, strict=strict, timeout_seconds=limit
        )
        out.append(1.0 if ok else 0.0)
    return out


math_verify.setup = _import_math_verify  # type: ignore[attr-defined]


# --------------------------------------------------------------------------------------------------
# format, length_penalty, exact_match
# --------------------------------------------------------------------------------------------------

# A \boxed{...} on the last line, or "#### <number>", then only whitespace, '.', '$', '\]' or ')'.
# The number is written as numeric_match reads it (3-digit comma groups), so the two agree on it.
DEFAULT_FORMAT_PATTERN = (
    r"(?:\\boxed\{[^\n]*\}|####\s*[-+\u2212]?\$?\s*(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?)[\s.$\\\])]*$"
)


@lru_cache(maxsize=64)
def _compile(pattern: str) -> re.Pattern[str]:
    return re.compile(pattern, re.DOTALL)


def format_reward(
    completions: list[str], rows: list[dict[str, Any]], *, pattern: str = DEFAULT_FORMAT_PATTERN
) -> list[float | None]:
    """1.0 when ``re.search(pattern, completion, re.DOTALL)`` matches, else 0.0.

    The default accepts a completion that ENDS with ``\\boxed{...}`` or ``#### <number>`` (trailing
    whitespace, ``.``, ``$``, ``\\]``, ``)`` allowed). Anchor your own pattern with ``$`` if the answer
    must come last.
    """
    rx = _compile(pattern)
    return [1.0 if rx.search(c) else 0.0 for c in completions]


def _length(completion: str, row: dict[str, Any], unit: str) -> int:
    if unit == "chars" or (unit == "auto" and "tokens" not in row):
        return len(completion)
    if "tokens" not in row:
        raise KeyError("length_penalty unit='tokens' needs a 'tokens' field (count or token ids) in the row")
    tokens = row["tokens"]
    return int(tokens) if isinstance(tokens, (int, float)) else len(tokens)


def length_penalty(
    completions: list[str],
    rows: list[dict[str, Any]],
    *,
    soft_limit: int,
    hard_limit: int,
    unit: str = "auto",
) -> list[float | None]:
    """0 up to ``soft_limit``, then linearly down to -1 at ``hard_limit`` (and -1 beyond).

    Length is counted in tokens when the row has a ``tokens`` field (the completion's token count, or
    its token ids) and ``unit`` is "auto" or "tokens"; otherwise in characters of the completion
    (``unit="chars"`` forces characters). Combine it with a positive weight: it is already negative.
    """
    _check_length_penalty({"soft_limit": soft_limit, "hard_limit": hard_limit, "unit": unit})
    out: list[float | None] = []
    for completion, row in zip(completions, rows, strict=True):
        n = _length(completion, row, unit)
        out.append(-min(1.0, max(0, n - soft_limit) / (hard_limit - soft_limit)))
    return out


DEFAULT_STOP_STRINGS: tuple[str, ...] = ("<|im_end|>", "<|endoftext|>", "<|eot_id|>", "</s>")


def _first_line(text: str, stop: Sequence[str]) -> str:
    for s in stop:
        text = text.split(s, 1)[0]
    return text.strip().split("\n", 1)[0]


def exact_match(
    completions: list[str],
    rows: list[dict[str, Any]],
    *,
    stop: Sequence[str] = DEFAULT_STOP_STRINGS,
    case_sensitive: bool = True,
) -> list[float | None]:
    """1.0 when the completion's first line equals the gold, whitespace runs collapsed, else 0.0.

    The completion is cut at the first of ``stop`` (end-of-turn tokens a template might leave in), then
    stripped and cut at its first newline: ``"  85\\nbecause..."`` matches gold ``"85"``.
    """
    out: list[float | None] = []
    for completion, row in zip(completions, rows, strict=True):
        pred = " ".join(_first_line(completion, stop).split())
        gold = " ".join(_gold(row).split())
        if not case_sensitive:
            pred, gold = pred.casefold(), gold.casefold()
        out.append(float(pred == gold))
    return out


# --------------------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------------------

BUILTINS: dict[str, Callable[..., list[float | None]]] = {
    "numeric_match": numeric_match,
    "math_verify": math_verify,
    "format": format_reward,
    "length_penalty": length_penalty,
    "exact_match": exact_match,
}

# The built-ins that return a verdict on the answer (1.0 correct, 0.0 wrong); the others shape the
# reward. These, or a 'module:function', are what `data.correctness` (accuracy, eval) accepts.
VERDICTS: tuple[str, ...] = ("numeric_match", "math_verify", "exact_match")

_IDENT = r"[A-Za-z_][A-Za-z0-9_]*"
FUNCTION_PATH_RE = re.compile(rf"^(?P<module>{_IDENT}(?:\.{_IDENT})*):(?P<attr>{_IDENT}(?:\.{_IDENT})*)$")


def check_function_name(function: str) -> None:
    """Raise RewardConfigError unless ``function`` is a built-in name or a well-formed ``module:function``.

    Imports nothing: a config is checked without running user code.
    """
    if function in BUILTINS or FUNCTION_PATH_RE.match(function):
        return
    if ":" in function:
        hint = "expected 'package.module:function' (dotted module path, one ':', a function name; no spaces)"
    else:
        close = difflib.get_close_matches(function, list(BUILTINS), n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        hint += (
            f"built-ins are {sorted(BUILTINS)}; your own function is referenced as 'package.module:function'"
        )
    raise RewardConfigError(
        f"reward {function!r}: not a built-in reward or a 'module:function' path — {hint}"
    )


def check_correctness_name(function: str) -> None:
    """Raise RewardConfigError unless ``function`` is a built-in verdict (``VERDICTS``) or a ``module:function``.

    A correctness function scores a completion 1.0 when its answer is right; accuracy counts those.
    """
    if function in VERDICTS or FUNCTION_PATH_RE.match(function):
        return
    hint = (
        f"did you mean {close[0]!r}? "
        if (close := difflib.get_close_matches(function, VERDICTS, n=1))
        else ""
    )
    raise RewardConfigError(
        f"correctness {function!r}: not a built-in verdict or a 'module:function' path — {hint}the built-in "
        f"verdicts are {list(VERDICTS)}; your own is referenced as 'package.module:function' and returns 1.0 "
        "for a correct completion"
    )


def _check_length_penalty(kwargs: dict[str, Any]) -> None:
    soft, hard, unit = kwargs.get("soft_limit"), kwargs.get("hard_limit"), kwargs.get("unit", "auto")
    if not isinstance(soft, int) or not isinstance(hard, int) or soft < 0 or hard <= soft:
        raise RewardConfigError(
            f"length_penalty needs integers 0 <= soft_limit < hard_limit, got soft_limit={soft!r}, hard_limit={hard!r}"
        )
    if unit not in ("auto", "chars", "tokens"):
        raise RewardConfigError(f"length_penalty unit must be 'auto', 'chars' or 'tokens', got {unit!r}")


def _check_format(kwargs: dict[str, Any]) -> None:
    pattern = kwargs.get("pattern", DEFAULT_FORMAT_PATTERN)
    try:
        _compile(pattern)
    except (re.error, TypeError) as e:
        raise RewardConfigError(f"format: pattern {pattern!r} is not a valid regular expression: {e}") from e


def _check_math_verify(kwargs: dict[str, Any]) -> None:
    for key in ("timeout_seconds", "float_rounding"):
        value = kwargs.get(key, 1)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise RewardConfigError(
                f"math_verify {key} must be a positive integer (signal.alarm takes whole seconds), got {value!r}"
            )


_KWARG_CHECKS: dict[str, Callable[[dict[str, Any]], None]] = {
    "length_penalty": _check_length_penalty,
    "format": _check_format,
    "math_verify": _check_math_verify,
}


def check_builtin_kwargs(function: str, kwargs: dict[str, Any]) -> None:
    """For a built-in, raise RewardConfigError if ``kwargs`` does not fit its keyword-only parameters."""
    fn = BUILTINS.get(function)
    if fn is None:
        return
    try:
        inspect.signature(fn).bind([], [], **kwargs)
    except TypeError as e:
        params = [p for p in inspect.signature(fn).parameters.values() if p.kind is p.KEYWORD_ONLY]
        accepted = ", ".join(p.name + ("" if p.default is p.empty else f"={p.default!r}") for p in params)
        raise RewardConfigError(
            f"reward {function!r}: kwargs {kwargs} do not fit ({e}); it accepts: {accepted or 'no kwargs'}"
        ) from None
    check = _KWARG_CHECKS.get(function)
    if check is not None:
        check(kwargs)


def resolve(function: str) -> RewardFn:
    """The callable for a built-in name or a ``module:function`` path (imports the module).

    Raises RewardConfigError naming the reward and what is wrong: malformed path, module not found,
    module failing to import, missing attribute, not callable.
    """
    check_function_name(function)
    if function in BUILTINS:
        return BUILTINS[function]  # type: ignore[return-value]
    module_name, attr = function.split(":", 1)
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name is not None and (module_name == e.name or module_name.startswith(e.name + ".")):
            raise RewardConfigError(
                f"reward {function!r}: module {module_name!r} not found — is it importable from the "
                f"working directory / installed?"
            ) from e
        raise RewardConfigError(
            f"reward {function!r}: importing module {module_name!r} failed: {type(e).__name__}: {e} "
            f"(a dependency of your reward module is missing)"
        ) from e
    except Exception as e:
        raise RewardConfigError(
            f"reward {function!r}: importing module {module_name!r} failed: {type(e).__name__}: {e}"
        ) from e
    obj: Any = module
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            names = [n for n in dir(module) if not n.startswith("_") and callable(getattr(module, n, None))]
            close = difflib.get_close_matches(attr, names, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise RewardConfigError(
                f"reward {function!r}: module {module_name!r} ({getattr(module, '__file__', '?')}) has no "
                f"attribute {attr!r}{hint}"
            ) from None
    if not callable(obj):
        raise RewardConfigError(
            f"reward {function!r}: {attr!r} is a {type(obj).__name__}, not a function with the signature "
            f"fn(completions, rows, **kwargs)"
        )
    return obj  # type: ignore[no-any-return]
