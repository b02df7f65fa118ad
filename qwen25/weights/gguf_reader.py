"""The GGUF header's value reader: a bounds-checked little-endian cursor over the mapped file that reads the
metadata's scalars, strings and arrays (string arrays of 150k entries, the vocabulary and its merges, without a
Python step per string), and the file error every GGUF reader raises. Format: ggml/docs/gguf.md.
"""

from __future__ import annotations

import struct
from enum import IntEnum
from pathlib import Path
from typing import Any

import numpy as np


class GGUFError(ValueError):
    """A GGUF file that cannot be read; the message starts with the file path."""


class _VT(IntEnum):
    """GGUF metadata value types."""

    UINT8 = 0
    INT8 = 1
    UINT16 = 2
    INT16 = 3
    UINT32 = 4
    INT32 = 5
    FLOAT32 = 6
    BOOL = 7
    STRING = 8
    ARRAY = 9
    UINT64 = 10
    INT64 = 11
    FLOAT64 = 12


_NUMPY: dict[_VT, np.dtype] = {
    t: np.dtype(c) for t, c in [(_VT.UINT8, "<u1"), (_VT.INT8, "<i1"), (_VT.UINT16, "<u2"), (_VT.INT16, "<i2"),
                                (_VT.UINT32, "<u4"), (_VT.INT32, "<i4"), (_VT.FLOAT32, "<f4"), (_VT.BOOL, "<u1"),
                                (_VT.UINT64, "<u8"), (_VT.INT64, "<i8"), (_VT.FLOAT64, "<f8")]
}
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")



class _Reader:
    """Bounds-checked little-endian cursor over the mapped file; every overrun is a truncation error."""

    def __init__(self, buf: memoryview, path: Path) -> None:
        self.buf, self.path, self.pos, self.size = buf, path, 0, len(buf)

    def need(self, n: int, what: str) -> int:
        start = self.pos
        if n < 0 or start + n > self.size:
            raise GGUFError(f"{self.path}: truncated file: {what} needs bytes {start}..{start + n} "
                            f"but the file has {self.size} bytes")
        self.pos = start + n
        return start

    def u32(self, what: str) -> int:
        return _U32.unpack_from(self.buf, self.need(4, what))[0]

    def u64(self, what: str) -> int:
        return _U64.unpack_from(self.buf, self.need(8, what))[0]

    def string(self, what: str) -> str:
        n = self.u64(what)
        start = self.need(n, what)
        # GGUF strings are bytes; surrogateescape keeps any non-UTF-8 token byte-exact instead of failing
        return str(self.buf[start:start + n], "utf-8", "surrogateescape")

    def value(self, vt: int, what: str) -> Any:
        if vt == _VT.STRING:
            return self.string(what)
        if vt == _VT.ARRAY:
            return self.array(what)
        if vt not in _NUMPY.keys():
            raise GGUFError(f"{self.path}: {what} has unknown value type {vt}")
        dt = _NUMPY[_VT(vt)]
        x = np.frombuffer(self.buf, dtype=dt, count=1, offset=self.need(dt.itemsize, what))[0]
        if vt == _VT.BOOL:
            return bool(x)
        if vt == _VT.FLOAT32:
            return float(str(x))  # shortest decimal that round-trips: 1e-06, not 9.999999974752427e-07
        return x.item()

    def array(self, what: str) -> list[Any]:
        vt, n = self.u32(what), self.u64(what)
        if vt in _NUMPY.keys():
            dt = _NUMPY[_VT(vt)]
            values = np.frombuffer(self.buf, dtype=dt, count=n, offset=self.need(n * dt.itemsize, what))
            return (values != 0).tolist() if vt == _VT.BOOL else values.tolist()
        if vt == _VT.STRING:
            return self._strings(n, what)
        if vt == _VT.ARRAY:
            return [self.array(what) for _ in range(n)]
        raise GGUFError(f"{self.path}: {what} has unknown array element type {vt}")

    def _strings(self, n: int, what: str) -> list[str]:
        """n length-prefixed strings (150k tokens + 150k merges for Qwen2.5). Their offsets first (found in bulk
        where the strings allow it, else walked length by length); the payloads are then decoded in one call: the
        8-byte prefixes become NUL separators (UTF-8 decoding restarts at every NUL, so this equals decoding each
        string alone). A string with a NUL of its own takes the per-string path."""
        buf, pos = self.buf, self.pos
        found = self._starts_of_short_strings(n)
        if found is not None:
            starts, pos = found
        else:
            starts, pos = self._walk_lengths(n, what)
        first, self.pos = (int(starts[0]) if n else pos), pos
        region = np.frombuffer(buf, dtype=np.uint8, count=pos - first, offset=first).copy()
        prefixes = np.asarray(starts, dtype=np.int64) - first
        region[prefixes] = 0  # each prefix's first byte: the separator; the other seven are dropped
        keep = np.ones(len(region), dtype=bool)
        keep[(prefixes[:, None] + np.arange(1, 8)).ravel()] = False
        payload = region[keep]
        if np.count_nonzero(payload == 0) == n:
            return payload.tobytes().decode("utf-8", "surrogateescape").split("\0")[1:]
        return self._strings_one_by_one([int(x) for x in starts])

    def _walk_lengths(self, n: int, what: str) -> tuple[list[int], int]:
        """The n strings' offsets from the cursor, length by length, and the offset after the last."""
        buf, pos, size, unpack = self.buf, self.pos, self.size, _U64.unpack_from
        starts = [0] * n
        for i in range(n):
            if pos + 8 > size:
                raise GGUFError(f"{self.path}: truncated file: {what} ends after {i} of {n} strings "
                                f"(file has {size} bytes)")
            starts[i] = pos
            pos += 8 + unpack(buf, pos)[0]
        if pos > size:
            raise GGUFError(f"{self.path}: truncated file: {what} ends after {n - 1} of {n} strings "
                            f"(file has {size} bytes)")
        return starts, pos

    def _starts_of_short_strings(self, n: int) -> tuple[np.ndarray, int] | None:
        """_walk_lengths with few Python steps for a vocabulary or its merges: strings mostly shorter than 256 bytes,
        without NULs. Such a string's 8-byte length has 7 zero high bytes, so its prefix is among the offsets
        followed by 7 zero bytes (the candidates); where a candidate's end (offset + 8 + its length byte) is the
        next candidate, that one is the next prefix, so runs of them are taken whole. The chain starts at the
        cursor and leaves the candidates only at a longer string (its length read from its prefix) or a false
        candidate (skipped): every offset taken is the end of the one before, as in the walk. None where the strings
        reach past the file (the walk then reports it)."""
        if n == 0:
            return None
        pos, room = self.pos, self.size - self.pos
        window = min(room, 24 * n + 64)  # Qwen2.5's vocabulary averages ~15 bytes per string
        while True:
            data = np.frombuffer(self.buf, dtype=np.uint8, count=window, offset=pos)
            zero = data == 0
            run = zero[1:max(window - 6, 1)].copy()
            for k in range(2, 8):
                run &= zero[k:window - 7 + k]
            cand = np.flatnonzero(run)
            ends = cand + 8 + data[cand]
            breaks = np.flatnonzero(ends[:-1] != cand[1:])  # the chain of candidates stops after these
            starts, count, at = np.empty(n, dtype=np.int64), 0, 0
            while count < n and at + 8 <= window:
                i = int(np.searchsorted(cand, at))
                if i < len(cand) and cand[i] == at:
                    j = int(np.searchsorted(breaks, i))
                    take = min((int(breaks[j]) + 1 if j < len(breaks) else len(cand)) - i, n - count)
                    starts[count:count + take] = cand[i:i + take]
                    count, at = count + take, int(ends[i + take - 1])
                else:  # a string of 256+ bytes (not a candidate): its whole 8-byte length
                    starts[count], count = at, count + 1
                    at += 8 + int.from_bytes(data[at:at + 8].tobytes(), "little")
                    if at > room:  # past the file: no wider window helps (the walk reports it)
                        return None
            if count == n:
                return None if at > room else (starts + pos, pos + at)
            if window == room:
                return None
            window = min(room, 4 * window)

    def _strings_one_by_one(self, starts: list[int]) -> list[str]:
        buf, unpack = self.buf, _U64.unpack_from
        return [str(buf[s + 8:s + 8 + unpack(buf, s)[0]], "utf-8", "surrogateescape") for s in starts]
