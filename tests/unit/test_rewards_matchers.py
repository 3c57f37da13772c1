"""Built-in reward functions, called directly (no scorer, no processes)."""

from __future__ import annotations

import threading
from fractions import Fraction
from typing import Any

import pytest

from rewards.builtin import (
    BUILTINS,
    exact_match,
    format_reward,
    last_boxed,
    length_penalty,
    math_verify,
    numeric_match,
    parse_number_answer,
)

# (completion, gold, expected verdict) — GSM8K-style completions as small models write them.
NUMERIC_CASES: list[tuple[str, str, float | None]] = [
    # "####" (the GSM8K reference format)
    ("Natalia sold 48/2 = 24 clips in May.\nShe sold 48+24 = 72 clips altogether.\n#### 72", "72", 1.0),
    ("Natalia sold 48/2 = 24 clips in May.\nShe sold 48+24 = 72 clips altogether.\n#### 71", "72", 0.0),
    ("We need 12 boxes.\n\n#### 12", "12", 1.0),
    ("#### 18\nCheck: 19 would be too many.", "18", 1.0),  # text after the #### line is ignored
    ("#### 5.0", "5", 1.0),  # 5.0 == 5
    ("#### 5.50", "5.5", 1.0),  # trailing zero in decimals
    ("#### 1,234.5", "1234.50", 1.0),
    ("#### \u22124", "-4", 1.0),  # U+2212 minus sign
    # \boxed{} wins over everything
    (r"Thus, she makes \boxed{18} dollars every day.", "18", 1.0),
    (r"So the total is \boxed{18}. Check: 9 + 9 = 18, and 20 would be too many.", "18", 1.0),
    (r"\boxed{1,234}", "1234", 1.0),
    (r"The price is \boxed{\$1{,}500}.", "1500", 1.0),  # LaTeX dollar and thousands separator
    (r"\boxed{x = 5}", "5", 1.0),  # the value after '='
    (r"\boxed{7}", "7.0", 1.0),
    (r"The answer is \boxed{}.", "5", 0.0),  # an empty box is a non-answer, not "last number"
    (r"\boxed{\frac{1}{2}}", "0.5", 1.0),  # fractions are compared exactly
    # "the answer is X"
    ("Half of 36 is 18. So the answer is 18.", "18", 1.0),
    ("Janet has 16 - 3 - 4 = 9 eggs, 9 * 2 = 18. The answer is $18.", "18", 1.0),
    ("The answer is -3.", "-3", 1.0),  # negative numbers
    ("The answer is 3.", "-3", 0.0),
    ("The answer is: 42", "42", 1.0),
    ("Answer: 7 cookies", "7", 1.0),  # trailing units
    ("The answer is 50%.", "50", 1.0),
    ("The answer is $2,000,000.", "2000000", 1.0),
    (
        "First 3 + 4 = 7, then 7 * 2 = 14. The answer is 15.",
        "14",
        0.0,
    ),  # reasoning has the gold, answer does not
    ("The answer is 0.333", "1/3", 0.0),  # exact: 0.333 is not 1/3
    # no marker: the last number
    ("Janet sells 16 - 3 - 4 = 9 eggs at $2 each, so she makes 9 * 2 = $18", "18", 1.0),
    ("The total cost is $1,234.", "1,234", 1.0),  # commas in the completion and in the gold
    ("He has 5 apples.", "5", 1.0),
    ("It costs 5 dollars", "5", 1.0),
    ("The temperature is -0 degrees", "0", 1.0),  # -0 == 0
    ("She earned $12.00 per hour.", "12", 1.0),
    ("So 3,000 + 2,000 = 5,000 in total.", "5000", 1.0),
    ("He is 30 years old now. In 5 years he will be 35.", "35", 1.0),
    ("In 5 years he will be 35. Now he is 30.", "35", 0.0),  # the last number is the answer
    ("Each friend gets 1/2 of the pizza.", "0.5", 1.0),
    ("The total is 10-5 = 5 dollars", "5", 1.0),  # "-5" in "10-5" is subtraction, not a negative number
    ("The answer is 20 apples, which means 4 baskets.", "20", 1.0),  # first number on the answer line
    ("I am not sure how to solve this problem.", "42", 0.0),  # no number at all
    ("", "42", 0.0),
    # gold that holds no number cannot be scored: masked, not 0
    ("#### 5", "n/a", None),
]


@pytest.mark.parametrize(("completion", "gold", "expected"), NUMERIC_CASES)
def test_numeric_match(completion: str, gold: str, expected: float | None) -> None:
    assert numeric_match([completion], [{"gold": gold}]) == [expected]


def test_numeric_match_batch_and_rel_tol() -> None:
    rows: list[dict[str, Any]] = [{"gold": "72"}, {"gold": "3.14159"}]
    assert numeric_match(["#### 72", "#### 3.1416"], rows) == [1.0, 0.0]
    assert numeric_match(["#### 72", "#### 3.1416"], rows, rel_tol=1e-4) == [1.0, 1.0]


def test_numeric_match_needs_gold() -> None:
    with pytest.raises(KeyError, match="no 'gold' field"):
        numeric_match(["#### 1"], [{"answer": "1"}])


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (r"\boxed{\frac{1}{2}}", r"\frac{1}{2}"),
        (r"\boxed{a} then \boxed{b}", "b"),
        (r"\boxed 18 apples", "18"),
        (r"\fbox{3}", "3"),
        (r"truncated \boxed{\frac{1}{2", r"\frac{1}{2"),
        ("no box", None),
    ],
)
def test_last_boxed(text: str, expected: str | None) -> None:
    assert last_boxed(text) == expected


def test_parse_number_answer_is_exact() -> None:
    assert parse_number_answer("#### 1,234.50") == Fraction(2469, 2)
    assert parse_number_answer(r"\boxed{-\frac{3}{4}}") == Fraction(-3, 4)


# --------------------------------------------------------------------------------------------------
# math_verify
# --------------------------------------------------------------------------------------------------

MATH_CASES: list[tuple[str, str, float | None]] = [
    (r"\frac{1}{2}", "The answer is $0.5$.", 1.0),
    ("0.5", r"So the probability is \boxed{\frac{1}{2}}.", 1.0),
    ("2", r"Therefore \boxed{\sqrt{4}}.", 1.0),
    ("x^2+2x+1", r"Expanding gives \boxed{(x+1)^2}.", 1.0),
    ("x^2", r"\boxed{x \cdot x}", 1.0),
    ("1,234", r"\boxed{1234}", 1.0),
    ("3", r"So the answer is \boxed{4}.", 0.0),  # not equivalent
    (r"\frac{1}{3}", r"\boxed{0.5}", 0.0),
    ("3", "I give up.", 0.0),  # nothing to compare
    ("", r"\boxed{4}", None),  # empty gold: cannot be scored
]


@pytest.mark.parametrize(("gold", "completion", "expected"), MATH_CASES)
def test_math_verify(gold: str, completion: str, expected: float | None) -> None:
    assert math_verify([completion], [{"gold": gold}]) == [expected]


def test_math_verify_off_the_main_thread() -> None:
    """math_verify's own timeouts use signal.alarm (main thread only); off it we must not raise."""
    result: list[Any] = []
    thread = threading.Thread(
        target=lambda: result.append(math_verify([r"\boxed{\sqrt{4}}"], [{"gold": "2"}]))
    )
    thread.start()
    thread.join(60)
    assert result == [[1.0]]


# --------------------------------------------------------------------------------------------------
# format, length_penalty, exact_match
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("completion", "expected"),
    [
        (r"9 + 9 = 18, so \boxed{18}", 1.0),
        ("9 + 9 = 18, so \\boxed{18}.\n", 1.0),
        ("$\\boxed{\\frac{1}{2}}$", 1.0),
        ("9 + 9 = 18\n#### 18", 1.0),
        ("#### 1,234.5 ", 1.0),
        (r"\boxed{18} is my guess, but let me keep thinking", 0.0),  # the answer must come last
        ("#### eighteen", 0.0),
        ("The answer is 18.", 0.0),
        ("", 0.0),
    ],
)
def test_format_default(completion: str, expected: float) -> None:
    assert format_reward([completion], [{"gold": "18"}]) == [expected]


def test_format_custom_pattern() -> None:
    rows: list[dict[str, Any]] = [{"gold": "1"}, {"gold": "1"}]
    pattern = r"<answer>\s*\S+\s*</answer>\s*$"
    assert format_reward(["<answer> 5 </answer>", "answer: 5"], rows, pattern=pattern) == [1.0, 0.0]


def test_length_penalty_characters() -> None:
    # soft 10, hard 20: linear from 0 at 10 chars to -1 at 20 chars, -1 beyond.
    completions = ["x" * 5, "x" * 10, "x" * 15, "x" * 20, "x" * 40]
    rows: list[dict[str, Any]] = [{"gold": ""}] * 5
    assert length_penalty(completions, rows, soft_limit=10, hard_limit=20) == [0.0, 0.0, -0.5, -1.0, -1.0]


def test_length_penalty_uses_row_tokens_when_present() -> None:
    rows: list[dict[str, Any]] = [{"gold": "", "tokens": 15}, {"gold": "", "tokens": list(range(12))}]
    assert length_penalty(["short", "short"], rows, soft_limit=10, hard_limit=20) == [-0.5, -0.2]
    assert length_penalty(["short", "short"], rows, soft_limit=10, hard_limit=20, unit="chars") == [0.0, 0.0]
    with pytest.raises(KeyError, match="tokens"):
        length_penalty(["short"], [{"gold": ""}], soft_limit=10, hard_limit=20, unit="tokens")


@pytest.mark.parametrize(
    ("completion", "gold", "expected"),
    [
        ("85", "85", 1.0),
        ("  85\nbecause 47 + 38 = 85", "85", 1.0),  # first line only
        ("85<|im_end|>", "85", 1.0),  # end-of-turn token left in by a template
        ("86", "85", 0.0),
        ("8 5", "85", 0.0),
        ("New   York  City", " New York City ", 1.0),  # whitespace runs collapse
        ("new york city", "New York City", 0.0),  # case sensitive by default
    ],
)
def test_exact_match(completion: str, gold: str, expected: float) -> None:
    assert exact_match([completion], [{"gold": gold}]) == [expected]


def test_exact_match_case_insensitive() -> None:
    assert exact_match(["new york city"], [{"gold": "New York City"}], case_sensitive=False) == [1.0]


def test_registry_names() -> None:
    assert set(BUILTINS) == {"numeric_match", "math_verify", "format", "length_penalty", "exact_match"}
