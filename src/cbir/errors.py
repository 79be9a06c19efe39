"""The few kinds of error a face has to tell apart, each mapped once by each face.

Every error cbir raises on purpose is a :class:`CbirError` of one kind, with a message a user can
act on. The CLI maps the kind to an exit status (``cli._user_errors``); the service maps it to an
HTTP status. Code deeper down raises the kind that fits and never thinks about faces.

The kinds also derive from the built-in exception a Python caller would expect (an invalid
request is a ``ValueError``, a missing thing a ``LookupError``), so ``except ValueError`` keeps
working for users of the Python API.
"""

from __future__ import annotations


class CbirError(Exception):
    """Base of every error cbir raises on purpose; ``kind`` names which kind it is."""

    kind = "error"


class InvalidRequestError(CbirError, ValueError):
    """An argument, option or query that cannot be used as given (the message says what is
    allowed)."""

    kind = "invalid"


class NotFoundError(CbirError, LookupError):
    """A collection, image, descriptor or file that does not exist."""

    kind = "not_found"

    def __str__(self) -> str:  # LookupError (KeyError's base) would quote the message
        return str(self.args[0]) if self.args else ""


class BusyError(CbirError):
    """The collection is being written by another process (or thread); try again later."""

    kind = "busy"


class UnavailableError(CbirError):
    """Something this installation cannot do: a feature that needs an extra, or a collection
    written by a newer cbir; the message says what to install or upgrade."""

    kind = "unavailable"


class CorruptError(CbirError):
    """A collection whose files cannot be trusted (missing or unreadable vectors, a catalogue
    that is not one); the message says what to do."""

    kind = "corrupt"


#: Every kind, for faces that map them: kind name -> class.
KINDS: dict[str, type[CbirError]] = {
    cls.kind: cls
    for cls in (InvalidRequestError, NotFoundError, BusyError, UnavailableError, CorruptError)
}


def kind_of(exc: BaseException) -> str | None:
    """The kind of an error a face should show the user, or None for a bug (let it raise).

    Besides :class:`CbirError`, an unusable query image (``images.ImageError``, which depends
    on nothing of ours) and the ``ValueError`` of a bad argument deep in a registry count as
    invalid requests.
    """
    if isinstance(exc, CbirError):
        return exc.kind
    from cbir.images import ImageError  # images depends on nothing else of ours

    if isinstance(exc, ImageError | ValueError):
        return InvalidRequestError.kind
    if isinstance(exc, FileNotFoundError):
        return NotFoundError.kind
    return None
