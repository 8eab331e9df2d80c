"""XACML 3.0 data types: parse a lexical form into a Python value and format it back.

Values are plain Python objects where that is exact (str, bool, int, float, bytes) and small
frozen classes where XML Schema semantics differ from Python's (dates with optional time zones,
durations, X.500 and RFC 822 names). Expressions carry their data type statically, so values need
no tag of their own.
"""
from __future__ import annotations

import base64
import binascii
import datetime as _dt
import math
import re
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from typing import Any, Callable

XS = "http://www.w3.org/2001/XMLSchema#"
STRING = XS + "string"
BOOLEAN = XS + "boolean"
INTEGER = XS + "integer"
DOUBLE = XS + "double"
TIME = XS + "time"
DATE = XS + "date"
DATETIME = XS + "dateTime"
DAYTIMEDURATION = XS + "dayTimeDuration"
YEARMONTHDURATION = XS + "yearMonthDuration"
ANYURI = XS + "anyURI"
HEXBINARY = XS + "hexBinary"
BASE64BINARY = XS + "base64Binary"
RFC822NAME = "urn:oasis:names:tc:xacml:1.0:data-type:rfc822Name"
X500NAME = "urn:oasis:names:tc:xacml:1.0:data-type:x500Name"
IPADDRESS = "urn:oasis:names:tc:xacml:2.0:data-type:ipAddress"
DNSNAME = "urn:oasis:names:tc:xacml:2.0:data-type:dnsName"
XPATHEXPRESSION = "urn:oasis:names:tc:xacml:3.0:data-type:xpathExpression"

# XACML 1.0/2.0 named the durations after an XQuery working draft; 3.0 keeps them as deprecated.
_WD = "http://www.w3.org/TR/2002/WD-xquery-operators-20020816#"
ALIASES = {_WD + "dayTimeDuration": DAYTIMEDURATION, _WD + "yearMonthDuration": YEARMONTHDURATION}


class ValueSyntaxError(ValueError):
    """A lexical form is not valid for its data type."""


_UTC = _dt.timezone.utc
_TZ_RE = r"(Z|[+-]\d{2}:\d{2})?"


def _tz(text: str | None) -> _dt.timezone | None:
    if not text:
        return None
    if text == "Z":
        return _UTC
    sign = -1 if text[0] == "-" else 1
    hours, minutes = int(text[1:3]), int(text[4:6])
    if hours > 14 or minutes > 59:
        raise ValueSyntaxError(f"bad time zone {text!r}")
    return _dt.timezone(sign * _dt.timedelta(hours=hours, minutes=minutes))


def _fmt_tz(tz: _dt.tzinfo | None, when: _dt.datetime) -> str:
    if tz is None:
        return ""
    off = when.utcoffset() or _dt.timedelta(0)
    if off == _dt.timedelta(0):
        return "Z"
    sign = "-" if off < _dt.timedelta(0) else "+"
    minutes = abs(int(off.total_seconds())) // 60
    return f"{sign}{minutes // 60:02d}:{minutes % 60:02d}"


@dataclass(frozen=True)
class DateTime:
    """xs:dateTime; a value without a time zone is compared as UTC (the PDP's implicit zone)."""

    value: _dt.datetime = field(compare=False)
    has_tz: bool = field(compare=False)
    key: _dt.datetime = field(init=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "key", self.value if self.has_tz else self.value.replace(tzinfo=_UTC))

    def __lt__(self, other: "DateTime") -> bool:
        return self.key < other.key


@dataclass(frozen=True)
class Date:
    value: _dt.date = field(compare=False)
    tz: _dt.timezone | None = field(compare=False)
    key: _dt.datetime = field(init=False, repr=False)

    def __post_init__(self) -> None:
        at = _dt.datetime(self.value.year, self.value.month, self.value.day, tzinfo=self.tz or _UTC)
        object.__setattr__(self, "key", at)

    def __lt__(self, other: "Date") -> bool:
        return self.key < other.key


@dataclass(frozen=True)
class Time:
    value: _dt.time = field(compare=False)
    key: _dt.datetime = field(init=False, repr=False)

    def __post_init__(self) -> None:
        t = self.value
        at = _dt.datetime(2000, 1, 1, t.hour, t.minute, t.second, t.microsecond, tzinfo=t.tzinfo or _UTC)
        object.__setattr__(self, "key", at)

    def __lt__(self, other: "Time") -> bool:
        return self.key < other.key


@dataclass(frozen=True, order=True)
class DayTimeDuration:
    seconds: Decimal


@dataclass(frozen=True, order=True)
class YearMonthDuration:
    months: int


@dataclass(frozen=True)
class Rfc822Name:
    """Local part compared exactly, domain part case-insensitively."""

    text: str = field(compare=False)
    local: str
    domain: str


@dataclass(frozen=True)
class X500Name:
    """A distinguished name; equality on normalised RDNs (RFC 2253 order, case folded)."""

    text: str = field(compare=False)
    rdns: tuple[frozenset[tuple[str, str]], ...]


def _parse_bool(text: str) -> bool:
    t = text.strip()
    if t in ("true", "1"):
        return True
    if t in ("false", "0"):
        return False
    raise ValueSyntaxError(f"not a boolean: {text!r}")


_INT_RE = re.compile(r"[+-]?\d+")


def _parse_int(text: str) -> int:
    t = text.strip()
    if not _INT_RE.fullmatch(t):
        raise ValueSyntaxError(f"not an integer: {text!r}")
    return int(t)


_DOUBLE_RE = re.compile(r"[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?")


def _parse_double(text: str) -> float:
    t = text.strip()
    special = {"INF": math.inf, "+INF": math.inf, "-INF": -math.inf, "NaN": math.nan}
    if t in special:
        return special[t]
    if not _DOUBLE_RE.fullmatch(t):
        raise ValueSyntaxError(f"not a double: {text!r}")
    return float(t)


def format_double(v: float) -> str:
    if math.isnan(v):
        return "NaN"
    if math.isinf(v):
        return "INF" if v > 0 else "-INF"
    return repr(v)


_FRAC = r"(\.\d+)?"
_DATETIME_RE = re.compile(r"(-?\d{4,})-(\d{2})-(\d{2})T(\d{2}):(\d{2}):(\d{2})" + _FRAC + _TZ_RE)
_DATE_RE = re.compile(r"(-?\d{4,})-(\d{2})-(\d{2})" + _TZ_RE)
_TIME_RE = re.compile(r"(\d{2}):(\d{2}):(\d{2})" + _FRAC + _TZ_RE)


def _micro(frac: str | None) -> int:
    return int((frac[1:] + "000000")[:6]) if frac else 0


def _parse_datetime(text: str) -> DateTime:
    m = _DATETIME_RE.fullmatch(text.strip())
    if not m:
        raise ValueSyntaxError(f"not a dateTime: {text!r}")
    y, mo, d, h, mi, s, frac, tz = m.groups()
    tzinfo = _tz(tz)
    try:
        extra = _dt.timedelta(0)
        if h == "24":  # 24:00:00 is the first instant of the next day
            if mi != "00" or s != "00" or _micro(frac):
                raise ValueError("24:xx")
            h, extra = "00", _dt.timedelta(days=1)
        v = _dt.datetime(int(y), int(mo), int(d), int(h), int(mi), int(s), _micro(frac), tzinfo=tzinfo) + extra
    except ValueError as exc:
        raise ValueSyntaxError(f"not a dateTime: {text!r}") from exc
    return DateTime(v, tzinfo is not None)


def _format_datetime(v: DateTime) -> str:
    d = v.value
    frac = f".{d.microsecond:06d}".rstrip("0") if d.microsecond else ""
    # not strftime("%Y"): it does not pad years below 1000 to four digits
    return (f"{d.year:04d}-{d.month:02d}-{d.day:02d}T{d.hour:02d}:{d.minute:02d}:{d.second:02d}"
            + frac + _fmt_tz(d.tzinfo if v.has_tz else None, d))


def _parse_date(text: str) -> Date:
    m = _DATE_RE.fullmatch(text.strip())
    if not m:
        raise ValueSyntaxError(f"not a date: {text!r}")
    y, mo, d, tz = m.groups()
    try:
        return Date(_dt.date(int(y), int(mo), int(d)), _tz(tz))
    except ValueError as exc:
        raise ValueSyntaxError(f"not a date: {text!r}") from exc


def _format_date(v: Date) -> str:
    at = _dt.datetime(v.value.year, v.value.month, v.value.day, tzinfo=v.tz)
    return v.value.isoformat() + _fmt_tz(v.tz, at)


def _parse_time(text: str) -> Time:
    m = _TIME_RE.fullmatch(text.strip())
    if not m:
        raise ValueSyntaxError(f"not a time: {text!r}")
    h, mi, s, frac, tz = m.groups()
    try:
        if h == "24" and mi == "00" and s == "00" and not _micro(frac):
            h = "00"
        return Time(_dt.time(int(h), int(mi), int(s), _micro(frac), tzinfo=_tz(tz)))
    except ValueError as exc:
        raise ValueSyntaxError(f"not a time: {text!r}") from exc


def _format_time(v: Time) -> str:
    t = v.value
    frac = f".{t.microsecond:06d}".rstrip("0") if t.microsecond else ""
    at = _dt.datetime(2000, 1, 1, tzinfo=t.tzinfo)
    return t.strftime("%H:%M:%S") + frac + _fmt_tz(t.tzinfo, at)


_DTD_RE = re.compile(r"(-)?P(?!$)(?:(\d+)D)?(?:T(?!$)(?:(\d+)H)?(?:(\d+)M)?(?:(\d+(?:\.\d+)?)S)?)?")
_YMD_RE = re.compile(r"(-)?P(?!$)(?:(\d+)Y)?(?:(\d+)M)?")


def _parse_dtd(text: str) -> DayTimeDuration:
    m = _DTD_RE.fullmatch(text.strip())
    if not m:
        raise ValueSyntaxError(f"not a dayTimeDuration: {text!r}")
    neg, d, h, mi, s = m.groups()
    total = Decimal(d or 0) * 86400 + Decimal(h or 0) * 3600 + Decimal(mi or 0) * 60 + Decimal(s or 0)
    return DayTimeDuration(-total if neg else total)


def _format_dtd(v: DayTimeDuration) -> str:
    total = abs(v.seconds)
    days, rest = divmod(total, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    out = ("-" if v.seconds < 0 else "") + "P" + (f"{int(days)}D" if days else "")
    time = (f"{int(hours)}H" if hours else "") + (f"{int(minutes)}M" if minutes else "")
    if secs:
        time += f"{secs.normalize():f}S"
    if time:
        out += "T" + time
    return out if out.rstrip("-") != "P" else "PT0S"


def _parse_ymd(text: str) -> YearMonthDuration:
    m = _YMD_RE.fullmatch(text.strip())
    if not m:
        raise ValueSyntaxError(f"not a yearMonthDuration: {text!r}")
    neg, y, mo = m.groups()
    months = int(y or 0) * 12 + int(mo or 0)
    return YearMonthDuration(-months if neg else months)


def _format_ymd(v: YearMonthDuration) -> str:
    y, m = divmod(abs(v.months), 12)
    body = (f"{y}Y" if y else "") + (f"{m}M" if m or not y else "")
    return ("-" if v.months < 0 else "") + "P" + body


def _parse_hex(text: str) -> bytes:
    try:
        return bytes.fromhex(text.strip())
    except ValueError as exc:
        raise ValueSyntaxError(f"not hexBinary: {text!r}") from exc


def _parse_b64(text: str) -> bytes:
    try:
        return base64.b64decode("".join(text.split()), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ValueSyntaxError(f"not base64Binary: {text!r}") from exc


def _parse_rfc822(text: str) -> Rfc822Name:
    t = text.strip()
    local, at, domain = t.rpartition("@")
    if not at or not local or not domain:
        raise ValueSyntaxError(f"not an rfc822Name: {text!r}")
    return Rfc822Name(t, local, domain.lower())


def _split_unescaped(text: str, sep: str) -> list[str]:
    parts, cur, i = [], [], 0
    while i < len(text):
        c = text[i]
        if c == "\\" and i + 1 < len(text):
            cur.append(text[i : i + 2])
            i += 2
            continue
        if c == sep:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(c)
        i += 1
    parts.append("".join(cur))
    return parts


def _parse_x500(text: str) -> X500Name:
    t = text.strip()
    rdns = []
    if t:
        for rdn in _split_unescaped(t, ","):
            avas = set()
            for ava in _split_unescaped(rdn, "+"):
                key, eq, value = ava.partition("=")
                if not eq or not key.strip():
                    raise ValueSyntaxError(f"not an x500Name: {text!r}")
                # X.520 caseIgnoreMatch with insignificant space, which is what names use in practice
                avas.add((key.strip().lower(), " ".join(value.strip().lower().split())))
            rdns.append(frozenset(avas))
    return X500Name(t, tuple(rdns))


_IP_RE = re.compile(
    r"(?:\d{1,3}(?:\.\d{1,3}){3}(?:/\d{1,3}(?:\.\d{1,3}){3})?|\[[0-9A-Fa-f:.]+\](?:/\[[0-9A-Fa-f:.]+\])?)"
    r"(?::(?:\d+|\d+-|-\d+|\d+-\d+))?"
)
_DNS_RE = re.compile(r"(?:\*\.)?[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?)*\.?"
                     r"(?::(?:\d+|\d+-|-\d+|\d+-\d+))?")


def _parse_ip(text: str) -> str:
    if not _IP_RE.fullmatch(text.strip()):
        raise ValueSyntaxError(f"not an ipAddress: {text!r}")
    return text.strip()


def _parse_dns(text: str) -> str:
    if not _DNS_RE.fullmatch(text.strip()):
        raise ValueSyntaxError(f"not a dnsName: {text!r}")
    return text.strip()


def _parse_uri(text: str) -> str:
    t = text.strip()
    if any(c in t for c in ' <>"{}|^`\\'):
        raise ValueSyntaxError(f"not an anyURI: {text!r}")
    return t


@dataclass(frozen=True)
class XPathExpression:
    """An xpathExpression request value: kept only to be echoed (IncludeInResult); XPath is not evaluated."""

    text: str
    xpath_category: str


@dataclass(frozen=True)
class DataType:
    uri: str
    short: str
    parse: Callable[[str], Any]
    format: Callable[[Any], str]


def _dt_entry(uri: str, parse: Callable[[str], Any], fmt: Callable[[Any], str]) -> DataType:
    return DataType(uri, uri.rsplit("#", 1)[-1].rsplit(":", 1)[-1], parse, fmt)


DATATYPES: dict[str, DataType] = {
    d.uri: d
    for d in (
        _dt_entry(STRING, lambda s: s, str),
        _dt_entry(BOOLEAN, _parse_bool, lambda v: "true" if v else "false"),
        _dt_entry(INTEGER, _parse_int, str),
        _dt_entry(DOUBLE, _parse_double, format_double),
        _dt_entry(TIME, _parse_time, _format_time),
        _dt_entry(DATE, _parse_date, _format_date),
        _dt_entry(DATETIME, _parse_datetime, _format_datetime),
        _dt_entry(DAYTIMEDURATION, _parse_dtd, _format_dtd),
        _dt_entry(YEARMONTHDURATION, _parse_ymd, _format_ymd),
        _dt_entry(ANYURI, _parse_uri, str),
        _dt_entry(HEXBINARY, _parse_hex, lambda v: v.hex().upper()),
        _dt_entry(BASE64BINARY, _parse_b64, lambda v: base64.b64encode(v).decode()),
        _dt_entry(RFC822NAME, _parse_rfc822, lambda v: v.text),
        _dt_entry(X500NAME, _parse_x500, lambda v: v.text),
        _dt_entry(IPADDRESS, _parse_ip, str),
        _dt_entry(DNSNAME, _parse_dns, str),
    )
}
SHORT_NAMES = {d.short: d.uri for d in DATATYPES.values()}


def canonical(uri: str) -> str:
    return ALIASES.get(uri, uri)


def parse_value(datatype: str, text: str) -> Any:
    """Parse ``text`` as ``datatype``; raise ValueSyntaxError naming the problem."""
    dt = DATATYPES.get(canonical(datatype))
    if dt is None:
        raise ValueSyntaxError(f"unsupported data type {datatype!r}")
    return dt.parse(text)


def format_value(datatype: str, value: Any) -> str:
    if isinstance(value, XPathExpression):
        return value.text
    return DATATYPES[canonical(datatype)].format(value)


def add_months(d: _dt.date, months: int) -> tuple[int, int, int]:
    """XML Schema date + yearMonthDuration: keep the day, clamp it to the month's end."""
    total = d.year * 12 + (d.month - 1) + months
    year, month = divmod(total, 12)
    month += 1
    if not 1 <= year <= 9999:
        raise ValueSyntaxError("date out of range")
    import calendar

    return year, month, min(d.day, calendar.monthrange(year, month)[1])


def datetime_plus_dtd(v: DateTime, d: DayTimeDuration, sign: int) -> DateTime:
    try:
        delta = _dt.timedelta(seconds=float(d.seconds)) * sign
        return DateTime(v.value + delta, v.has_tz)
    except (OverflowError, ValueError, InvalidOperation) as exc:
        raise ValueSyntaxError("dateTime out of range") from exc


def datetime_plus_ymd(v: DateTime, d: YearMonthDuration, sign: int) -> DateTime:
    y, m, day = add_months(v.value.date(), d.months * sign)
    return DateTime(v.value.replace(year=y, month=m, day=day), v.has_tz)


def date_plus_ymd(v: Date, d: YearMonthDuration, sign: int) -> Date:
    y, m, day = add_months(v.value, d.months * sign)
    return Date(_dt.date(y, m, day), v.tz)


def now_values(now: _dt.datetime) -> dict[str, tuple[str, Any]]:
    """current-time/date/dateTime for a request that did not supply them (one fixed instant)."""
    now = now.astimezone(_UTC) if now.tzinfo else now.replace(tzinfo=_UTC)
    return {
        "time": (TIME, Time(now.timetz())),
        "date": (DATE, Date(now.date(), _UTC)),
        "dateTime": (DATETIME, DateTime(now, True)),
    }
