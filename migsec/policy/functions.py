"""The XACML 3.0 function set (core spec §10.2.5 and Appendix A.3), with static signatures.

Each function declares its parameter and return types so that a policy with a type error is
refused at load time (the spec lets a PDP do that, and it is what an operator wants to hear about
before a request arrives). Implementations take evaluated arguments; a bag is a Python list.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, Callable, Sequence

from migsec.policy import datatypes as T
from migsec.policy.datatypes import ValueSyntaxError

F1 = "urn:oasis:names:tc:xacml:1.0:function:"
F2 = "urn:oasis:names:tc:xacml:2.0:function:"
F3 = "urn:oasis:names:tc:xacml:3.0:function:"

Type = tuple[str, bool]  # (data type URI, is a bag)
FUNCTION_TYPE: Type = ("function", False)  # the type of a <Function> argument


class EvalError(Exception):
    """A function failed at evaluation time: the expression is Indeterminate (processing-error)."""


class StaticTypeError(Exception):
    """Arguments of the wrong number or type for a function."""


@dataclass(frozen=True)
class Function:
    id: str
    ret: Type
    params: tuple[Type, ...]
    impl: Callable[..., Any]
    variadic_min: int | None = None  # the last param repeats, at least this many times in all
    lazy: bool = False  # impl receives zero-argument callables (and/or/n-of short-circuit)
    higher_order: bool = False

    def check(self, args: Sequence[Type], fn_arg: "Function | None" = None) -> Type:
        if self.higher_order:
            return _check_higher_order(self, args, fn_arg)
        n = len(self.params)
        if self.variadic_min is None:
            if len(args) != n:
                raise StaticTypeError(f"{self.id} takes {n} argument(s), got {len(args)}")
            expected = self.params
        else:
            if len(args) < self.variadic_min:
                raise StaticTypeError(f"{self.id} takes at least {self.variadic_min} arguments, got {len(args)}")
            expected = self.params[:-1] + (self.params[-1],) * (len(args) - n + 1)
        for i, (want, got) in enumerate(zip(expected, args)):
            if want != got:
                raise StaticTypeError(f"{self.id} argument {i + 1}: expected {_tname(want)}, got {_tname(got)}")
        return self.ret


def _tname(t: Type) -> str:
    return ("bag of " if t[1] else "") + t[0].rsplit("#", 1)[-1].rsplit(":", 1)[-1]


FUNCTIONS: dict[str, Function] = {}


def _reg(fid: str, ret: Type, params: Sequence[Type], impl: Callable[..., Any], **kw: Any) -> None:
    FUNCTIONS[fid] = Function(fid, ret, tuple(params), impl, **kw)


def s(dt: str) -> Type:
    return (dt, False)


def b(dt: str) -> Type:
    return (dt, True)


BOOL, INT, DBL, STR, URI = s(T.BOOLEAN), s(T.INTEGER), s(T.DOUBLE), s(T.STRING), s(T.ANYURI)

# --- equality and comparison ------------------------------------------------------------------
_ALL = {
    "string": T.STRING, "boolean": T.BOOLEAN, "integer": T.INTEGER, "double": T.DOUBLE,
    "time": T.TIME, "date": T.DATE, "dateTime": T.DATETIME, "anyURI": T.ANYURI,
    "hexBinary": T.HEXBINARY, "base64Binary": T.BASE64BINARY, "dayTimeDuration": T.DAYTIMEDURATION,
    "yearMonthDuration": T.YEARMONTHDURATION, "x500Name": T.X500NAME, "rfc822Name": T.RFC822NAME,
    "ipAddress": T.IPADDRESS, "dnsName": T.DNSNAME,
}
_NS_3 = {"dayTimeDuration", "yearMonthDuration"}  # 3.0 ids for these; 1.0 used the WD types
_NO_EQUAL = {"ipAddress", "dnsName"}


def _same(a: Any, c: Any) -> bool:
    # NaN equals NaN here, as in the conformance suite (IIC350) and Java's Double.equals
    return a == c or (isinstance(a, float) and isinstance(c, float) and math.isnan(a) and math.isnan(c))


def _eq(a: Any, c: Any) -> bool:
    return a == c


for _name, _uri in _ALL.items():
    if _name in _NO_EQUAL:
        continue
    _ns = F3 if _name in _NS_3 else F1
    _reg(f"{_ns}{_name}-equal", BOOL, [s(_uri), s(_uri)], _same if _name == "double" else _eq)
_reg(F3 + "string-equal-ignore-case", BOOL, [STR, STR], lambda a, c: a.casefold() == c.casefold())

for _name in ("integer", "double", "string", "time", "date", "dateTime"):
    _uri = _ALL[_name]
    _reg(f"{F1}{_name}-greater-than", BOOL, [s(_uri)] * 2, lambda a, c: a > c)
    _reg(f"{F1}{_name}-greater-than-or-equal", BOOL, [s(_uri)] * 2, lambda a, c: not a < c and (a == c or a > c))
    _reg(f"{F1}{_name}-less-than", BOOL, [s(_uri)] * 2, lambda a, c: a < c)
    _reg(f"{F1}{_name}-less-than-or-equal", BOOL, [s(_uri)] * 2, lambda a, c: a < c or a == c)


def _time_in_range(t: T.Time, lo: T.Time, hi: T.Time) -> bool:
    # the range may wrap past midnight; compare as seconds in the UTC day
    def sec(x: T.Time) -> float:
        k = x.key.astimezone(T._UTC)
        return k.hour * 3600 + k.minute * 60 + k.second + k.microsecond / 1e6

    a, l, h = sec(t), sec(lo), sec(hi)
    return l <= a <= h if l <= h else a >= l or a <= h


_reg(F2 + "time-in-range", BOOL, [s(T.TIME)] * 3, _time_in_range)

# --- arithmetic ---------------------------------------------------------------------------------


def _int_div(a: int, c: int) -> int:
    if c == 0:
        raise EvalError("integer-divide by zero")
    q = abs(a) // abs(c)  # truncate toward zero like XPath idiv
    return q if (a >= 0) == (c >= 0) else -q


def _int_mod(a: int, c: int) -> int:
    if c == 0:
        raise EvalError("integer-mod by zero")
    return a - _int_div(a, c) * c


def _dbl_div(a: float, c: float) -> float:
    if c == 0:
        raise EvalError("double-divide by zero")
    return a / c


def _round(x: float) -> float:
    if math.isnan(x) or math.isinf(x):
        return x
    return float(math.floor(x + 0.5))  # XPath fn:round: halves go toward +infinity


def _to_int(x: float) -> int:
    if math.isnan(x) or math.isinf(x):
        raise EvalError(f"double-to-integer of {T.format_double(x)}")
    return int(x)


_reg(F1 + "integer-add", INT, [INT, INT], lambda *a: sum(a), variadic_min=2)
_reg(F1 + "double-add", DBL, [DBL, DBL], lambda *a: math.fsum(a) if all(map(math.isfinite, a)) else sum(a), variadic_min=2)
_reg(F1 + "integer-multiply", INT, [INT, INT], lambda *a: math.prod(a), variadic_min=2)
_reg(F1 + "double-multiply", DBL, [DBL, DBL], lambda *a: math.prod(a), variadic_min=2)
_reg(F1 + "integer-subtract", INT, [INT, INT], lambda a, c: a - c)
_reg(F1 + "double-subtract", DBL, [DBL, DBL], lambda a, c: a - c)
_reg(F1 + "integer-divide", INT, [INT, INT], _int_div)
_reg(F1 + "double-divide", DBL, [DBL, DBL], _dbl_div)
_reg(F1 + "integer-mod", INT, [INT, INT], _int_mod)
_reg(F1 + "integer-abs", INT, [INT], abs)
_reg(F1 + "double-abs", DBL, [DBL], abs)
_reg(F1 + "round", DBL, [DBL], _round)
_reg(F1 + "floor", DBL, [DBL], lambda x: float(math.floor(x)) if math.isfinite(x) else x)
_reg(F1 + "double-to-integer", INT, [DBL], _to_int)
_reg(F1 + "integer-to-double", DBL, [INT], float)

# --- strings ---------------------------------------------------------------------------------------
_reg(F1 + "string-normalize-space", STR, [STR], lambda x: x.strip(" \t\n\r"))
_reg(F1 + "string-normalize-to-lower-case", STR, [STR], lambda x: x.lower())
_reg(F2 + "string-concatenate", STR, [STR, STR], lambda *a: "".join(a), variadic_min=2)
_reg(F2 + "uri-string-concatenate", URI, [URI, STR], lambda *a: "".join(a), variadic_min=2)  # deprecated 2.0
for _t, _u in (("string", STR), ("anyURI", URI)):
    _reg(f"{F3}{_t}-starts-with", BOOL, [STR, _u], lambda p, x: x.startswith(p))
    _reg(f"{F3}{_t}-ends-with", BOOL, [STR, _u], lambda p, x: x.endswith(p))
    _reg(f"{F3}{_t}-contains", BOOL, [STR, _u], lambda p, x: p in x)


def _substring(x: str, start: int, end: int) -> str:
    if start < 0 or start > len(x) or (end != -1 and (end < start or end > len(x))):
        raise EvalError(f"substring indexes {start}, {end} out of range for length {len(x)}")
    return x[start:] if end == -1 else x[start:end]


_reg(F3 + "string-substring", STR, [STR, INT, INT], _substring)
_reg(F3 + "anyURI-substring", STR, [URI, INT, INT], _substring)

# --- conversions to and from string (3.0) ------------------------------------------------------------


def _from_string(uri: str) -> Callable[[str], Any]:
    def conv(text: str) -> Any:
        try:
            return T.parse_value(uri, text)
        except ValueSyntaxError as exc:
            raise EvalError(str(exc)) from exc

    return conv


def _to_string(uri: str) -> Callable[[Any], str]:
    return lambda v: T.format_value(uri, v)


for _name, _uri in _ALL.items():
    if _name in ("string", "anyURI"):
        continue
    _reg(f"{F3}{_name}-from-string", s(_uri), [STR], _from_string(_uri))
    _reg(f"{F3}string-from-{_name}", STR, [s(_uri)], _to_string(_uri))
_reg(F3 + "anyURI-from-string", URI, [STR], _from_string(T.ANYURI))
_reg(F3 + "string-from-anyURI", STR, [URI], str)

# --- logical ------------------------------------------------------------------------------------------


def _or(*thunks: Callable[[], bool]) -> bool:
    err = None
    for th in thunks:
        try:
            if th():
                return True
        except EvalError as exc:  # another argument may still be True
            err = err or exc
    if err:
        raise err
    return False


def _and(*thunks: Callable[[], bool]) -> bool:
    err = None
    for th in thunks:
        try:
            if not th():
                return False
        except EvalError as exc:
            err = err or exc
    if err:
        raise err
    return True


def _n_of(n_thunk: Callable[[], int], *thunks: Callable[[], bool]) -> bool:
    n = n_thunk()
    if n > len(thunks):
        raise EvalError(f"n-of needs {n} true arguments but has only {len(thunks)}")
    if n <= 0:
        return True
    true = 0
    for i, th in enumerate(thunks):
        if th():
            true += 1
            if true >= n:
                return True
        if true + (len(thunks) - i - 1) < n:
            return False
    return False


_reg(F1 + "or", BOOL, [BOOL], _or, variadic_min=0, lazy=True)
_reg(F1 + "and", BOOL, [BOOL], _and, variadic_min=0, lazy=True)
_reg(F1 + "n-of", BOOL, [INT, BOOL], _n_of, variadic_min=1, lazy=True)
_reg(F1 + "not", BOOL, [BOOL], lambda x: not x)

# --- date and time arithmetic -----------------------------------------------------------------------------


def _wrap(fn: Callable[..., Any]) -> Callable[..., Any]:
    def call(*a: Any) -> Any:
        try:
            return fn(*a)
        except (ValueSyntaxError, OverflowError, ValueError) as exc:
            raise EvalError(str(exc)) from exc

    return call


_DTT, _DTD, _YMD, _DATE = s(T.DATETIME), s(T.DAYTIMEDURATION), s(T.YEARMONTHDURATION), s(T.DATE)
for _ns, _d, _y in ((F3, _DTD, _YMD), (F1, _DTD, _YMD)):
    _reg(_ns + "dateTime-add-dayTimeDuration", _DTT, [_DTT, _d], _wrap(lambda a, d: T.datetime_plus_dtd(a, d, 1)))
    _reg(_ns + "dateTime-subtract-dayTimeDuration", _DTT, [_DTT, _d], _wrap(lambda a, d: T.datetime_plus_dtd(a, d, -1)))
    _reg(_ns + "dateTime-add-yearMonthDuration", _DTT, [_DTT, _y], _wrap(lambda a, d: T.datetime_plus_ymd(a, d, 1)))
    _reg(_ns + "dateTime-subtract-yearMonthDuration", _DTT, [_DTT, _y], _wrap(lambda a, d: T.datetime_plus_ymd(a, d, -1)))
    _reg(_ns + "date-add-yearMonthDuration", _DATE, [_DATE, _y], _wrap(lambda a, d: T.date_plus_ymd(a, d, 1)))
    _reg(_ns + "date-subtract-yearMonthDuration", _DATE, [_DATE, _y], _wrap(lambda a, d: T.date_plus_ymd(a, d, -1)))

# --- bags and sets, for every type ---------------------------------------------------------------------------


def _one_and_only(bag: list[Any]) -> Any:
    if len(bag) != 1:
        raise EvalError(f"one-and-only on a bag of {len(bag)} values")
    return bag[0]


def _dedup(values: list[Any]) -> list[Any]:
    out: list[Any] = []
    for v in values:
        if not any(_same(v, o) for o in out):
            out.append(v)
    return out


def _in(v: Any, bag: list[Any]) -> bool:
    return any(_same(v, x) for x in bag)


for _name, _uri in _ALL.items():
    _ns = F3 if _name in _NS_3 else (F2 if _name in _NO_EQUAL else F1)
    one, bag = s(_uri), b(_uri)
    _reg(f"{_ns}{_name}-one-and-only", one, [bag], _one_and_only)
    _reg(f"{_ns}{_name}-bag-size", INT, [bag], len)
    _reg(f"{_ns}{_name}-is-in", BOOL, [one, bag], _in)
    _reg(f"{_ns}{_name}-bag", bag, [one], lambda *a: list(a), variadic_min=0)
    _reg(f"{_ns}{_name}-intersection", bag, [bag, bag], lambda x, y: _dedup([v for v in x if _in(v, y)]))
    _reg(f"{_ns}{_name}-at-least-one-member-of", BOOL, [bag, bag], lambda x, y: any(_in(v, y) for v in x))
    _reg(f"{_ns}{_name}-union", bag, [bag, bag], lambda *a: _dedup([v for x in a for v in x]), variadic_min=2)
    _reg(f"{_ns}{_name}-subset", BOOL, [bag, bag], lambda x, y: all(_in(v, y) for v in x))
    _reg(f"{_ns}{_name}-set-equals", BOOL, [bag, bag], lambda x, y: all(_in(v, y) for v in x) and all(_in(v, x) for v in y))

# --- regular expressions and name matching ------------------------------------------------------------------


def _xsd_regex(pattern: str) -> re.Pattern[str]:
    # XML Schema regexes are close to Python's; translate the few classes Python lacks
    py = pattern.replace(r"\i", r"[A-Za-z_:]").replace(r"\c", r"[-.0-9A-Za-z_:]")
    py = re.sub(r"\\p\{Is[A-Za-z]+\}|\\p\{L[ulo]?\}", r"[^\\W\\d_]", py)
    try:
        return _regex_cache(py)
    except re.error as exc:
        raise EvalError(f"bad regular expression {pattern!r}: {exc}") from exc


_RE_CACHE: dict[str, re.Pattern[str]] = {}


def _regex_cache(p: str) -> re.Pattern[str]:
    pat = _RE_CACHE.get(p)
    if pat is None:
        pat = _RE_CACHE[p] = re.compile(p)
    return pat


def _regexp_match(pattern: str, value: Any) -> bool:
    text = value.text if isinstance(value, (T.Rfc822Name, T.X500Name)) else str(value)
    return _xsd_regex(pattern).search(text) is not None


for _name, _ns in (("string", F1), ("anyURI", F2), ("ipAddress", F2), ("dnsName", F2), ("rfc822Name", F2), ("x500Name", F2)):
    _reg(f"{_ns}{_name}-regexp-match", BOOL, [STR, s(_ALL[_name])], _regexp_match)


def _x500_match(a: T.X500Name, c: T.X500Name) -> bool:
    n = len(a.rdns)
    return n <= len(c.rdns) and c.rdns[len(c.rdns) - n :] == a.rdns  # RFC 2253 order: suffix is the root


def _rfc822_match(pattern: str, name: T.Rfc822Name) -> bool:
    if "@" in pattern:
        local, _, domain = pattern.rpartition("@")
        return local == name.local and domain.lower() == name.domain
    p = pattern.lower()
    if p.startswith("."):
        return name.domain.endswith(p)
    return name.domain == p


_reg(F1 + "x500Name-match", BOOL, [s(T.X500NAME), s(T.X500NAME)], _x500_match)
_reg(F1 + "rfc822Name-match", BOOL, [STR, s(T.RFC822NAME)], _rfc822_match)

# --- higher-order ---------------------------------------------------------------------------------------------
# Implemented in the evaluator (they call back into a function); here only their signatures.
HIGHER_ORDER = {"any-of", "all-of", "any-of-any", "all-of-any", "any-of-all", "all-of-all", "map"}
for _h in HIGHER_ORDER:  # 1.0 ids kept; "1.0 map" never existed but AT&T's deprecated tests use it
    for _ns in (F3, F1):
        _reg(_ns + _h, BOOL, [], lambda *a: None, higher_order=True)


def _check_higher_order(f: Function, args: Sequence[Type], fn: "Function | None") -> Type:
    name = f.id.rsplit(":", 1)[-1]
    if not args or args[0] != FUNCTION_TYPE or fn is None:
        raise StaticTypeError(f"{f.id}: the first argument must be a <Function>")
    rest = list(args[1:])
    if fn.higher_order:
        raise StaticTypeError(f"{f.id}: a higher-order function cannot be the argument")
    if name in ("any-of", "all-of", "map"):
        bags = [i for i, t in enumerate(rest) if t[1]]
        if len(bags) != 1 or len(rest) < 1:
            raise StaticTypeError(f"{f.id} takes a function, primitive values and exactly one bag")
        call = [(t[0], False) for t in rest]
        ret = fn.check(call)
        if name == "map":
            if ret[1]:
                raise StaticTypeError(f"{f.id}: the function must return a primitive value")
            return (ret[0], True)
    else:
        if len(rest) != 2 or not all(t[1] for t in rest):
            raise StaticTypeError(f"{f.id} takes a function and two bags")
        ret = fn.check([(t[0], False) for t in rest])
    if ret != BOOL:
        raise StaticTypeError(f"{f.id}: the function must return a boolean")
    return BOOL


# XACML 1.0/2.0 ids of the duration functions, deprecated in 3.0 but still to be accepted
for _fid in [f for f in FUNCTIONS if f.startswith(F3 + "dayTimeDuration-") or f.startswith(F3 + "yearMonthDuration-")]:
    if "from-string" not in _fid:
        FUNCTIONS.setdefault(F1 + _fid[len(F3):], FUNCTIONS[_fid])


def lookup(fid: str) -> Function | None:
    return FUNCTIONS.get(fid)
