"""XDR (RFC 4506) reading and writing, as much as libvirt's RPC needs.

Every item is a multiple of 4 bytes, big endian; strings and variable opaques are a u32
length, the bytes, then zero padding to 4. A ``*T`` (libvirt's ``remote_string``) is a bool
(u32 0/1) followed by T when 1. The reader checks every length against the bytes left and
against the caller's maximum before slicing, and insists on zero padding and canonical
booleans, so a packet that decodes also re-encodes to the same bytes.
"""
from __future__ import annotations

import struct

from migsec.protocol.errors import RpcFilterError

_U32 = struct.Struct(">I")
_I32 = struct.Struct(">i")
_U64 = struct.Struct(">Q")
_I64 = struct.Struct(">q")
_F64 = struct.Struct(">d")


def _pad(n: int) -> int:
    return (4 - n % 4) % 4


class XdrReader:
    """Reads XDR items from ``data``; RpcFilterError names what is wrong and where."""

    __slots__ = ("_data", "_pos", "_what")

    def __init__(self, data: bytes, what: str) -> None:
        self._data = memoryview(data)
        self._pos = 0
        self._what = what

    def _take(self, n: int, item: str) -> memoryview:
        if n > len(self._data) - self._pos:
            raise RpcFilterError(f"{self._what}: truncated {item} at byte {self._pos} "
                                 f"(needs {n}, {len(self._data) - self._pos} left)")
        view = self._data[self._pos:self._pos + n]
        self._pos += n
        return view

    def u32(self, item: str = "unsigned int") -> int:
        return _U32.unpack(self._take(4, item))[0]

    def i32(self, item: str = "int") -> int:
        return _I32.unpack(self._take(4, item))[0]

    def u64(self, item: str = "unsigned hyper") -> int:
        return _U64.unpack(self._take(8, item))[0]

    def i64(self, item: str = "hyper") -> int:
        return _I64.unpack(self._take(8, item))[0]

    def f64(self, item: str = "double") -> float:
        return _F64.unpack(self._take(8, item))[0]

    def boolean(self, item: str = "bool") -> bool:
        value = self.u32(item)
        if value not in (0, 1):
            raise RpcFilterError(f"{self._what}: {item} is {value}, not a boolean 0/1")
        return value == 1

    def fixed_opaque(self, n: int, item: str = "fixed opaque") -> bytes:
        data = bytes(self._take(n, item))
        self._padding(n, item)
        return data

    def opaque(self, maximum: int, item: str = "opaque") -> bytes:
        n = self.u32(f"{item} length")
        if n > maximum:
            raise RpcFilterError(f"{self._what}: {item} is {n} bytes, above its {maximum}-byte limit")
        return self.fixed_opaque(n, item)

    def string(self, maximum: int, item: str = "string") -> str:
        raw = self.opaque(maximum, item)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise RpcFilterError(f"{self._what}: {item} is not UTF-8") from exc

    def optional_string(self, maximum: int, item: str = "string") -> str | None:
        return self.string(maximum, item) if self.boolean(f"{item} presence") else None

    def _padding(self, n: int, item: str) -> None:
        if any(self._take(_pad(n), f"{item} padding")):
            raise RpcFilterError(f"{self._what}: {item} has non-zero XDR padding")

    def done(self) -> None:
        """Refuse trailing bytes: every byte of a body must belong to its declared struct."""
        if self._pos != len(self._data):
            raise RpcFilterError(f"{self._what}: {len(self._data) - self._pos} trailing bytes "
                                 "after the body")


class XdrWriter:
    """Accumulates XDR items; ``bytes()`` gives the encoding."""

    __slots__ = ("_parts",)

    def __init__(self) -> None:
        self._parts: list[bytes] = []

    def u32(self, value: int) -> "XdrWriter":
        self._parts.append(_U32.pack(value))
        return self

    def i32(self, value: int) -> "XdrWriter":
        self._parts.append(_I32.pack(value))
        return self

    def u64(self, value: int) -> "XdrWriter":
        self._parts.append(_U64.pack(value))
        return self

    def i64(self, value: int) -> "XdrWriter":
        self._parts.append(_I64.pack(value))
        return self

    def f64(self, value: float) -> "XdrWriter":
        self._parts.append(_F64.pack(value))
        return self

    def boolean(self, value: bool) -> "XdrWriter":
        return self.u32(1 if value else 0)

    def fixed_opaque(self, data: bytes) -> "XdrWriter":
        self._parts.append(bytes(data) + b"\0" * _pad(len(data)))
        return self

    def opaque(self, data: bytes) -> "XdrWriter":
        return self.u32(len(data)).fixed_opaque(data)

    def string(self, value: str) -> "XdrWriter":
        return self.opaque(value.encode("utf-8"))

    def optional_string(self, value: str | None) -> "XdrWriter":
        if value is None:
            return self.boolean(False)
        return self.boolean(True).string(value)

    def __bytes__(self) -> bytes:
        return b"".join(self._parts)
