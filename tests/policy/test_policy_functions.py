"""Data types and functions beyond what the conformance suite pins down."""
from __future__ import annotations

import math
from decimal import Decimal

import pytest
from hypothesis import given, strategies as st

from migsec.policy import datatypes as T
from migsec.policy.functions import F1, F2, F3, FUNCTIONS, EvalError, StaticTypeError


def fn(name: str):
    for ns in (F3, F1, F2):
        if ns + name in FUNCTIONS:
            return FUNCTIONS[ns + name].impl
    raise KeyError(name)


def p(dt: str, text: str):
    return T.parse_value(dt, text)


@pytest.mark.parametrize("a, b, q, r", [(7, 2, 3, 1), (-7, 2, -3, -1), (7, -2, -3, 1), (-7, -2, 3, -1)])
def test_integer_divide_and_mod_truncate_toward_zero(a, b, q, r):
    assert fn("integer-divide")(a, b) == q
    assert fn("integer-mod")(a, b) == r


@pytest.mark.parametrize("name", ["integer-divide", "integer-mod", "double-divide"])
def test_division_by_zero_is_an_error(name):
    with pytest.raises(EvalError, match="zero"):
        fn(name)(1, 0)


def test_round_and_conversions():
    assert fn("round")(2.5) == 3.0 and fn("round")(-2.5) == -2.0 and fn("round")(2.4) == 2.0
    assert fn("double-to-integer")(-3.9) == -3
    with pytest.raises(EvalError):
        fn("double-to-integer")(math.nan)


def test_substring_bounds():
    sub = fn("string-substring")
    assert sub("migsec", 1, 3) == "ig" and sub("migsec", 3, -1) == "sec"
    for args in ((-1, 2), (7, -1), (3, 2), (0, 7)):
        with pytest.raises(EvalError):
            sub("migsec", *args)


def test_dates_and_durations():
    dtt = p(T.DATETIME, "2024-01-31T10:00:00Z")
    plus_month = fn("dateTime-add-yearMonthDuration")(dtt, p(T.YEARMONTHDURATION, "P1M"))
    assert T.format_value(T.DATETIME, plus_month) == "2024-02-29T10:00:00Z"  # clamped to month end
    minus = fn("dateTime-subtract-dayTimeDuration")(dtt, p(T.DAYTIMEDURATION, "P1DT2H"))
    assert T.format_value(T.DATETIME, minus) == "2024-01-30T08:00:00Z"
    # the same instant in two zones is equal
    assert fn("dateTime-equal")(p(T.DATETIME, "2024-01-01T12:00:00+02:00"), p(T.DATETIME, "2024-01-01T10:00:00Z"))
    assert fn("date-less-than")(p(T.DATE, "2024-01-01"), p(T.DATE, "2024-01-02"))
    assert fn("dayTimeDuration-equal")(p(T.DAYTIMEDURATION, "PT36H"), p(T.DAYTIMEDURATION, "P1DT12H"))
    assert fn("time-in-range")(p(T.TIME, "23:30:00Z"), p(T.TIME, "22:00:00Z"), p(T.TIME, "02:00:00Z"))
    assert not fn("time-in-range")(p(T.TIME, "12:00:00Z"), p(T.TIME, "22:00:00Z"), p(T.TIME, "02:00:00Z"))


def test_names():
    assert fn("rfc822Name-equal")(p(T.RFC822NAME, "Anne@SUN.com"), p(T.RFC822NAME, "Anne@sun.COM"))
    assert not fn("rfc822Name-equal")(p(T.RFC822NAME, "anne@sun.com"), p(T.RFC822NAME, "Anne@sun.com"))
    m = fn("rfc822Name-match")
    assert m(".east.sun.com", p(T.RFC822NAME, "a@isrg.east.sun.com"))
    assert not m(".east.sun.com", p(T.RFC822NAME, "a@east.sun.com"))
    assert m("sun.com", p(T.RFC822NAME, "a@SUN.com")) and m("a@sun.com", p(T.RFC822NAME, "a@sun.com"))
    x = fn("x500Name-match")
    assert x(p(T.X500NAME, "O=Medico Corp,C=US"), p(T.X500NAME, "cn=John Smith,o=Medico Corp, c=US"))
    assert not x(p(T.X500NAME, "O=Other,C=US"), p(T.X500NAME, "cn=John Smith,o=Medico Corp,c=US"))


def test_bags_and_sets():
    assert fn("integer-union")([1, 2], [2, 3], [4]) == [1, 2, 3, 4]
    assert fn("integer-intersection")([1, 2, 2, 3], [2, 3, 5]) == [2, 3]
    assert fn("integer-set-equals")([1, 2, 2], [2, 1])
    with pytest.raises(EvalError, match="bag of 2"):
        fn("string-one-and-only")(["a", "b"])


def test_logical_functions_keep_errors_unless_decided():
    def boom():
        raise EvalError("x")

    assert fn("or")(boom, lambda: True) is True
    assert fn("and")(boom, lambda: False) is False
    with pytest.raises(EvalError):
        fn("or")(boom, lambda: False)
    assert fn("n-of")(lambda: 2, lambda: True, lambda: False, lambda: True)
    with pytest.raises(EvalError):
        fn("n-of")(lambda: 3, lambda: True, lambda: True)


def test_regexp_uses_search_semantics():
    assert fn("string-regexp-match")("^J.*t$", "Julius Hibbert")
    assert fn("string-regexp-match")("Hib", "Julius Hibbert")
    with pytest.raises(EvalError, match="bad regular expression"):
        fn("string-regexp-match")("(", "x")


def test_static_signature_checks():
    add = FUNCTIONS[F1 + "integer-add"]
    with pytest.raises(StaticTypeError, match="at least 2"):
        add.check([(T.INTEGER, False)])
    with pytest.raises(StaticTypeError, match="expected integer, got bag of integer"):
        add.check([(T.INTEGER, False), (T.INTEGER, True)])
    assert add.check([(T.INTEGER, False)] * 5) == (T.INTEGER, False)


@pytest.mark.parametrize("dt, bad", [
    (T.INTEGER, "1.0"), (T.BOOLEAN, "yes"), (T.DOUBLE, "1e"), (T.DATE, "2024-02-30"), (T.DATETIME, "2024-01-01"),
    (T.TIME, "25:00:00"), (T.DAYTIMEDURATION, "P1Y"), (T.YEARMONTHDURATION, "P1D"), (T.HEXBINARY, "ABC"),
    (T.BASE64BINARY, "%%%"), (T.RFC822NAME, "nobody"), (T.IPADDRESS, "10.0.0"), (T.DNSNAME, "-bad-.com"),
    (T.DAYTIMEDURATION, "P"), (T.ANYURI, "has space"),
])
def test_bad_lexical_forms_are_refused(dt, bad):
    with pytest.raises(T.ValueSyntaxError):
        T.parse_value(dt, bad)


@given(st.datetimes(timezones=st.sampled_from([T._UTC, T._tz("+05:30"), T._tz("-08:00")])))
def test_datetime_round_trip(value):
    v = T.DateTime(value, True)
    assert T.parse_value(T.DATETIME, T.format_value(T.DATETIME, v)) == v


@given(st.decimals(min_value=-10**9, max_value=10**9, places=3, allow_nan=False))
def test_day_time_duration_round_trip(seconds):
    v = T.DayTimeDuration(Decimal(seconds))
    assert T.parse_value(T.DAYTIMEDURATION, T.format_value(T.DAYTIMEDURATION, v)) == v


@given(st.integers(min_value=-10**6, max_value=10**6))
def test_year_month_duration_round_trip(months):
    v = T.YearMonthDuration(months)
    assert T.parse_value(T.YEARMONTHDURATION, T.format_value(T.YEARMONTHDURATION, v)) == v


@given(st.floats(allow_nan=True, allow_infinity=True))
def test_double_round_trip(x):
    back = T.parse_value(T.DOUBLE, T.format_value(T.DOUBLE, x))
    assert back == x or (math.isnan(x) and math.isnan(back))


@given(st.binary(max_size=64))
def test_binary_round_trips(b):
    assert T.parse_value(T.HEXBINARY, T.format_value(T.HEXBINARY, b)) == b
    assert T.parse_value(T.BASE64BINARY, T.format_value(T.BASE64BINARY, b)) == b
