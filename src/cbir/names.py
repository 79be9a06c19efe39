"""File names as the catalogue stores them and as faces show them.

A POSIX file name is bytes. Python hands a name that is not valid UTF-8 (``b'\\xff\\xfe.jpg'``,
common on old archives) to us as text with lone surrogates (``os.fsdecode``'s
``surrogateescape``), which SQLite's UTF-8 text cannot hold. So the catalogue stores such a name
as :data:`BYTES_MARK` followed by the hex of its bytes: lossless (:func:`from_stored` gives back
the exact name, which opens the same file), and never confused with a real name, which is
absolute and starts with ``/``. Valid UTF-8 names, nearly all of them, are stored as they are.
Faces show names through :func:`printable`: undecodable bytes as ``\\xff``, control characters
(a newline in a name) as escapes, so one name is one line and printing never fails.
"""

from __future__ import annotations

import os

#: Starts a stored name that is the hex of a file name's bytes (see the module docstring).
BYTES_MARK = "\x01"
#: C0 control characters and DEL, shown as escapes (``\\n``, ``\\x1b``).
_CONTROLS = {c: repr(chr(c))[1:-1] for c in (*range(0x20), 0x7F)}


def _is_utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def to_stored(text: str) -> str:
    """A file name (or a label made from one) as the catalogue stores it."""
    if _is_utf8(text) and not text.startswith(BYTES_MARK):
        return text
    return BYTES_MARK + os.fsencode(text).hex()


def from_stored(text: str | None) -> str | None:
    """The name :func:`to_stored` stored (None stays None)."""
    if text is None or not text.startswith(BYTES_MARK):
        return text
    return os.fsdecode(bytes.fromhex(text[len(BYTES_MARK) :]))


def printable(text: str) -> str:
    """A name (or a message holding names) as a user reads it: valid UTF-8 on one line, every
    byte that is not text shown as ``\\xNN``."""
    try:
        raw = text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:  # a surrogate that is no escaped byte
        raw = text.encode("utf-8", "backslashreplace")
    return raw.decode("utf-8", "backslashreplace").translate(_CONTROLS)
