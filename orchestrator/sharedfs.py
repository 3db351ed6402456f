"""Is a path on a filesystem several jobs share? (sqlite on NFS/Lustre/GPFS is a known way to
corrupt an MLflow store when several campaigns write it.)

Pure parsing of ``/proc/mounts``; the caller reads the file.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

MOUNTS = Path("/proc/mounts")
SHARED_TYPES = frozenset({"nfs", "nfs4", "lustre", "gpfs", "beegfs", "cifs", "smb3", "smbfs", "ceph",
                          "glusterfs", "fuse.glusterfs", "fuse.sshfs", "panfs", "wekafs", "fuse.weka"})
"""Network and parallel filesystems: visible from several nodes, so from several jobs."""


@dataclass(frozen=True)
class Mount:
    point: str
    fstype: str


def _unescape(field: str) -> str:
    """``/proc/mounts`` escapes space, tab, newline and backslash as octal."""
    for code, char in (("\\040", " "), ("\\011", "\t"), ("\\012", "\n"), ("\\134", "\\")):
        field = field.replace(code, char)
    return field


def parse_mounts(text: str) -> list[Mount]:
    """Mount points and types, in the order of the table (later mounts hide earlier ones)."""
    mounts = []
    for line in text.splitlines():
        fields = line.split()
        if len(fields) >= 3:
            mounts.append(Mount(_unescape(fields[1]), fields[2]))
    return mounts


def mount_of(path: Path, mounts: list[Mount]) -> Mount | None:
    """The mount holding ``path`` (absolute): the longest matching mount point, the last one on ties."""
    text = str(path)
    best: Mount | None = None
    for m in mounts:
        point = m.point.rstrip("/") or "/"
        inside = text == point or text.startswith(point + "/") or point == "/"
        if inside and (best is None or len(point) >= len(best.point.rstrip("/") or "/")):
            best = m
    return best


def shared_filesystem(path: Path, mounts_text: str) -> str | None:
    """The filesystem type when ``path`` sits on a shared (network/parallel) filesystem, else None."""
    m = mount_of(path.absolute(), parse_mounts(mounts_text))
    return m.fstype if m is not None and m.fstype in SHARED_TYPES else None


def sqlite_on_shared_fs(uri: str, mounts_text: str) -> str | None:
    """A one-line warning when a ``sqlite:///`` tracking file sits on a shared filesystem."""
    if not uri.startswith("sqlite:///"):
        return None
    raw = uri.removeprefix("sqlite:///").split("?", 1)[0]
    if not raw or raw == ":memory:":
        return None
    db = Path(raw).absolute()
    fstype = shared_filesystem(db, mounts_text)
    if fstype is None:
        return None
    return (f"the MLflow sqlite file {db} is on a shared {fstype} filesystem: several jobs writing it can "
            "corrupt it; for more than one campaign at a time run one `mlflow server` and set "
            "tracking.uri: http://HOST:PORT (README: one MLflow server for many campaigns)")


def read_mounts() -> str:
    try:
        return MOUNTS.read_text()
    except OSError:
        return ""
