"""Annotation files read a piece at a time: a corpus of millions of records must not be held as text.

:func:`open_text` decodes a file as it is read and hashes its bytes on the way; :class:`JSONStream`
walks a JSON document's top-level object or list and decodes one member or element at a time, with
the standard library's decoder and its error messages (line and column in the whole file).
"""

from __future__ import annotations

import hashlib
import io
import json
import re
from collections.abc import Callable, Iterator
from typing import IO

_WS = re.compile(r"[ \t\n\r]*")  # JSON's whitespace
_NUMBER_TAIL = re.compile(r"[0-9+\-.eE]*\Z")  # what a number cut by the buffer's end may be followed by
_NEXT = re.compile(r"[ \t\n\r]*([,\]])[ \t\n\r]*")  # what follows a list's element: its separator
_MAX_VALUE_CHARS = 64 << 20  # a value that fails to decode with this much text after its start is invalid


OnRead = Callable[[int], None]  # told how many more bytes of the file were read (a progress bar's update)


class _HashingReader(io.RawIOBase):
    """A binary file that updates a sha256 with every byte read from it (and tells ``on_read``)."""

    def __init__(self, raw: IO[bytes], on_read: OnRead | None = None):
        self._raw = raw
        self._on_read = on_read
        self.sha256 = hashlib.sha256()

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        n = self._raw.readinto(b)
        self.sha256.update(memoryview(b)[:n])
        if self._on_read is not None:
            self._on_read(n)
        return n

    def close(self) -> None:
        self._raw.close()
        super().close()


def open_text(path, on_read: OnRead | None = None) -> tuple[io.TextIOWrapper, _HashingReader]:
    """``path`` as text (UTF-8, a leading BOM dropped, invalid bytes kept as surrogates for the
    per-record checks to report, line endings as written, which ``csv`` needs) and the reader whose
    ``sha256`` covers the bytes read so far."""
    hashing = _HashingReader(open(path, "rb"), on_read)  # noqa: SIM115 -- closed with the wrapper
    text = io.TextIOWrapper(io.BufferedReader(hashing, 1 << 20), encoding="utf-8-sig", errors="surrogateescape",
                            newline="")
    return text, hashing


def first_char(path) -> str:
    """The file's first character that is not whitespace ("" for none)."""
    text, _ = open_text(path)
    with text:
        while chunk := text.read(1 << 16):
            if stripped := chunk.lstrip():
                return stripped[0]
    return ""


class JSONStream:
    """One JSON document read from ``text`` a chunk at a time.

    Values are decoded by ``decoder.raw_decode``; this class only parses the brackets, commas and
    colons of the one container it walks, so a malformed document fails with the message
    ``json.loads`` gives, at the same line and column."""

    def __init__(self, text: IO[str], decoder: json.JSONDecoder, chunk_chars: int = 1 << 20):
        self._text = text
        self._decoder = decoder
        self._chunk = chunk_chars
        self._buf = ""
        self._pos = 0  # in _buf
        self._eof = False
        self._chars_before = 0  # text dropped from _buf's front
        self._lines_before = 0  # newlines in it
        self._col_before = 0  # characters after the last of them

    def _fill(self, want: int = 0) -> bool:
        """Read at least ``want`` more characters, dropping the consumed text; False at the end
        (the buffer then stays as it was)."""
        if self._eof or not (more := self._text.read(max(want, self._chunk))):
            self._eof = True
            return False
        dropped = self._buf[: self._pos]
        self._chars_before += len(dropped)
        if (nl := dropped.rfind("\n")) >= 0:
            self._lines_before += dropped.count("\n")
            self._col_before = len(dropped) - nl - 1
        else:
            self._col_before += len(dropped)
        self._buf, self._pos = self._buf[self._pos:] + more, 0
        return True

    def _error(self, msg: str, pos: int | None = None) -> json.JSONDecodeError:
        """``msg`` at ``pos`` in the buffer (default: the current position), placed in the whole file."""
        pos = self._pos if pos is None else pos
        nl = self._buf.rfind("\n", 0, pos)
        line = self._lines_before + self._buf.count("\n", 0, pos) + 1
        col = pos - nl if nl >= 0 else self._col_before + pos + 1
        exc = json.JSONDecodeError(msg, "", 0)
        exc.pos, exc.lineno, exc.colno = self._chars_before + pos, line, col
        exc.args = (f"{msg}: line {line} column {col} (char {exc.pos})",)
        return exc

    def peek(self) -> str:
        """The next character that is not whitespace ("" at the end), not consumed."""
        while True:
            self._pos = _WS.match(self._buf, self._pos).end()
            if self._pos < len(self._buf):
                return self._buf[self._pos]
            if not self._fill():
                return ""

    def _take(self, char: str, msg: str) -> None:
        if self.peek() != char:
            raise self._error(msg)
        self._pos += 1

    def value(self):
        """Decode the next value. A value cut by the buffer's end is retried with more text, and so is
        a number followed by nothing but number characters up to it (``1`` of ``1.5e3``)."""
        self.peek()
        while True:
            try:
                obj, end = self._decoder.raw_decode(self._buf, self._pos)
            except json.JSONDecodeError as exc:
                if len(self._buf) - self._pos < _MAX_VALUE_CHARS and self._fill(len(self._buf) - self._pos):
                    continue
                raise self._error(exc.msg, exc.pos) from None
            if isinstance(obj, int | float) and _NUMBER_TAIL.match(self._buf, end) and self._fill():
                continue
            self._pos = end
            return obj

    def keys(self) -> Iterator[str]:
        """Walk the top-level object: yields each key with the stream at its value, which the caller
        reads (:meth:`value` or :meth:`elements`) before the next key."""
        self._take("{", "Expecting value")
        if self.peek() == "}":
            self._pos += 1
            return
        while True:
            if self.peek() != '"':
                raise self._error("Expecting property name enclosed in double quotes")
            key = self.value()
            self._take(":", "Expecting ':' delimiter")
            yield key
            if self.peek() == "}":
                self._pos += 1
                return
            self._take(",", "Expecting ',' delimiter")

    def elements(self) -> Iterator:
        """Decode the list at the stream's position one element at a time. An element that the buffer
        holds up to its separator takes one decoder call and one match (a file's records: most of
        its time); one cut by the buffer's end, or invalid, takes :meth:`value`'s way."""
        self._take("[", "Expecting value")
        if self.peek() == "]":
            self._pos += 1
            return
        decode, separator = self._decoder.raw_decode, _NEXT.match
        while True:
            try:
                obj, end = decode(self._buf, self._pos)
                sep = separator(self._buf, end)
            except json.JSONDecodeError:
                sep = None
            if sep is not None:  # a value cut by the buffer's end is not followed by its separator in it
                self._pos = sep.end()
                yield obj
                if sep.group(1) == "]":
                    return
                continue
            yield self.value()
            if self.peek() == "]":
                self._pos += 1
                return
            self._take(",", "Expecting ',' delimiter")
            self.peek()  # at the next element, where the decoder starts

    def end(self) -> None:
        """Check that only whitespace follows the document."""
        if self.peek():
            raise self._error("Extra data")
