"""The shared argument checks: what they accept and the errors they raise."""

from __future__ import annotations

import pytest

from relreg.validate import check_choice, check_positive_int


@pytest.mark.parametrize("value", [1, 7])
def test_positive_ints_pass(value):
    check_positive_int("steps", value)


@pytest.mark.parametrize("value", [0, -2, 1.0, True, "3", None])
def test_everything_else_names_the_argument_and_the_value(value):
    with pytest.raises(ValueError, match=rf"Expected steps an int >= 1, but got {value!r}\."):
        check_positive_int("steps", value)


def test_none_only_when_allowed():
    check_positive_int("limit", None, allow_none=True)
    with pytest.raises(ValueError, match=r"Expected limit an int >= 1 or None, but got 0\."):
        check_positive_int("limit", 0, allow_none=True)


def test_choices():
    check_choice("mode", "self", ("self", "label"))
    message = r"Expected mode one of \('self', 'label'\), but got 'x'\."
    with pytest.raises(ValueError, match=message):
        check_choice("mode", "x", ("self", "label"))
