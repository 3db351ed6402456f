"""A full disk is a passing fault: told apart from a bug, named in one line, resumable.

The campaign's own writes raise ``OSError(ENOSPC/EDQUOT)``; a sim that cannot write its result
just fails (its stderr says why); Dask, MLflow or a parser fail their own ways. So whatever
stops a campaign, :func:`full` asks the file system holding the run dir whether it is out of
space, and :func:`disk_full_error` turns the cause into :class:`~orchestrator.errors.DiskFull`,
which ends the run as interrupted (exit 75) with what to do.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

from orchestrator.errors import DiskFull

FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
LOW_SPACE_BYTES = 1 << 20
"""Less free space than this (for us: ``f_bavail``) under the run dir counts as a full disk."""
FULL_WORDS = tuple(os.strerror(e) for e in FULL_ERRNOS)
"""How C's strerror names them, as a sim's stderr would say it."""


def is_full_error(exc: BaseException) -> bool:
    return isinstance(exc, OSError) and exc.errno in FULL_ERRNOS


def full(path: Path) -> bool:
    """Whether the file system holding ``path`` has (almost) no space left for us."""
    try:
        st = os.statvfs(path)
    except OSError:
        return False
    return st.f_bavail * st.f_frsize < LOW_SPACE_BYTES


def says_full(text: str) -> bool:
    """Whether a message (a sim's stderr tail) reports a full disk or quota."""
    return any(word in text for word in FULL_WORDS)


def disk_full_error(root: Path, cause: BaseException | str) -> DiskFull:
    """The one line a full disk ends the campaign with."""
    if isinstance(cause, OSError):
        where = f": {cause.filename}" if cause.filename else ""
        detail = f"{cause.strerror}{where}"
    else:
        said = str(cause).splitlines()[0][:300] if str(cause) else ""
        detail = f"{os.strerror(errno.ENOSPC)}{'; ' + said if said else ''}"
    return DiskFull(f"the disk holding {root} is full ({detail}); the run stopped at its last checkpoint: "
                    f"free space there, then resume with: python -m orchestrator run --resume {root}")
