"""A test-only hook: pause the writer at a named point, so that a test can kill it exactly there.

``CBIR_TEST_PAUSE_AT=POINT`` (or ``POINT#N``, the N-th time it is reached) makes the process
that reaches :func:`pause_point` with that name write ``cbir: paused at POINT`` to stderr and
sleep until it is killed. Unset (always, outside the kill trials of the test suite) it costs one
lookup in ``os.environ``. This is the one place the variable is read. The points, in the order
a run reaches them:

- ``extract``: a result has come back from extraction (ingest), not yet written;
- ``batch-files``: a batch's segment files are written, its transaction not begun (store);
- ``batch-commit``: a batch's transaction is done, not yet committed;
- ``state-file``: what a descriptor learned is written to a temporary file, not committed;
- ``state-commit``: its transaction (the old vectors dropped) is done, not yet committed;
- ``remove-commit``: a removal's transaction is done, not yet committed;
- ``compact-files``: compaction's new segment is written, its transaction not begun;
- ``compact-commit``: compaction's transaction is done, not yet committed;
- ``compact-unlink``: compaction committed, the replaced segment files not yet deleted.
"""

from __future__ import annotations

import os
import sys
import time
from collections import Counter

ENV = "CBIR_TEST_PAUSE_AT"
POINTS = frozenset({
    "extract", "batch-files", "batch-commit", "state-file", "state-commit", "remove-commit",
    "compact-files", "compact-commit", "compact-unlink",
})  # fmt: skip
#: How long each sleep of a paused process lasts (it sleeps until killed).
PAUSE_SECONDS = 3600
_reached: Counter[str] = Counter()


def pause_point(name: str) -> None:
    """Pause here for ever if ``CBIR_TEST_PAUSE_AT`` names this point (see the module)."""
    wanted = os.environ.get(ENV)
    if not wanted:
        return
    point, _, nth = wanted.partition("#")
    if point != name:
        return
    _reached[name] += 1
    if _reached[name] != int(nth or 1):
        return
    sys.stderr.write(f"cbir: paused at {wanted}\n")
    sys.stderr.flush()
    while True:
        time.sleep(PAUSE_SECONDS)
