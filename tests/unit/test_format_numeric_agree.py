"""numeric_match reads the number of every answer the `format` reward accepts (issue 16: `#### -$5`
with gold -5 scored 0.0 by numeric_match and 1.0 by format)."""

from __future__ import annotations

from decimal import Decimal

from hypothesis import given, settings
from hypothesis import strategies as st

from rewards.builtin import format_reward, numeric_match


def test_sign_before_a_currency_sign_is_part_of_the_number() -> None:
    rows = [{"gold": "-5"}]
    for text in ("#### -$5", "#### -$ 5", "#### \u2212$5", "The total is \\boxed{-\\$5}.", "answer: -$5"):
        assert numeric_match([text], rows) == [1.0], text
    assert numeric_match(["#### $5"], rows) == [0.0]  # +5 is not -5
    assert numeric_match(["10-$5 = $5"], [{"gold": "5"}]) == [1.0]  # subtraction, not a sign: last number


def _grouped(n: int) -> str:
    return f"{n:,}"


_numbers = st.tuples(
    st.integers(min_value=0, max_value=10**9),
    st.booleans(),  # thousands separators
    st.one_of(
        st.none(), st.integers(min_value=0, max_value=999).map(lambda d: f"{d:03d}".rstrip("0") or "0")
    ),
)


@settings(max_examples=300, deadline=None)
@given(
    prefix=st.sampled_from(["", "So the total is 12 apples.\n", "3 + 4 = 7\n"]),
    sign=st.sampled_from(["", "-", "+", "\u2212"]),
    dollar=st.sampled_from(["", "$", "$ "]),
    space=st.sampled_from(["", " ", "  "]),
    number=_numbers,
    trailing=st.sampled_from(["", ".", " ", "$", "\n", " .\n", ")", "\\]"]),
    boxed=st.booleans(),
)
def test_numeric_match_agrees_with_format(
    prefix: str, sign: str, dollar: str, space: str, number: tuple, trailing: str, boxed: bool
) -> None:
    integer, grouped, decimals = number
    digits = (_grouped(integer) if grouped else str(integer)) + (f".{decimals}" if decimals else "")
    answer = f"{sign}{dollar}{digits}"
    if boxed:
        text = f"{prefix}\\boxed{{{answer.replace('$', chr(92) + '$')}}}{trailing}"
    else:
        text = f"{prefix}####{space}{answer}{trailing}"
    value = Decimal(digits.replace(",", "")) * (-1 if sign in ("-", "\u2212") else 1)
    assert format_reward([text], [{}]) == [1.0], text
    assert numeric_match([text], [{"gold": str(value)}]) == [1.0], (text, str(value))
