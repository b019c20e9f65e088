"""Content-keyed cache files shared by every process: written once, capped, cleaned up.

The decoded-split cache (harness/data.py) and the feature cache (harness/features.py) keep one
`.npy` file per content key in a folder that every trial process of every sweep shares. The rules
that keep that folder correct and bounded live here, without TensorFlow:

- **One copy, written once.** A writer fills a temporary file whose name carries its host and pid,
  then moves it into place with `os.replace` (atomic): a reader sees a complete file or none. Two
  processes racing on one key both write, the second replace wins, and each reads a complete file
  (a file already open or mapped stays readable after it is replaced or deleted).
- **Leftovers of killed writers go.** A temporary file whose writer is dead (same host, pid gone) or
  that has not been written to for `STALE_SECONDS` (another host's, whose pid cannot be checked) is
  deleted on the next start (`remove_stale_partials`). A live writer's file is left alone.
- **A size cap, least recently used first.** Every use touches the entry's modification time; when
  a write would take the folder past its cap, the entries used longest ago are deleted first
  (`evict`), never the one being written or just used.

    >>> path = folder / f"{key}.npy"
    >>> if not use(path):                      # touch on use; False when absent
    ...     tmp = partial_path(path)
    ...     evict(folder, cap_bytes, incoming=nbytes, keep=path)
    ...     ... write tmp ...
    ...     publish(tmp, path)
"""

from __future__ import annotations

import os
import re
import socket
import time
from pathlib import Path

STALE_SECONDS = 24 * 3600  # a temporary file untouched this long has no live writer (pid unknown)
PARTIAL = re.compile(r"^(?P<stem>.+)\.partial-(?P<host>[^/]+)-(?P<pid>\d+)(?P<suffix>\.[A-Za-z0-9]+)?$")
# Per-process copies an earlier version wrote (a tf.data cache file per trial process): never read
# any more, so garbage once their process is gone.
LEGACY_PER_PROCESS = re.compile(r"-pid(?P<pid>\d+)(?:[._].*)?$")
LEGACY_PARTIAL = re.compile(r"^.+\.(?P<pid>\d+)\.partial\.npy$")  # features, before the host was named
ENTRY_SUFFIX = ".npy"


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9.]", "_", socket.gethostname()) or "host"


def partial_path(path: Path) -> Path:
    """Where this process writes `path` before publishing it: unique to this host and process."""
    return path.with_name(f"{path.stem}.partial-{_host()}-{os.getpid()}{path.suffix}")


def publish(partial: Path, path: Path) -> None:
    """Move a finished temporary file into place, atomically (a racing writer's copy is replaced
    by an identical one; readers of either see a complete file)."""
    os.replace(partial, path)


def use(path: Path) -> bool:
    """Mark an entry as used now (its modification time is the LRU clock); False if it is absent.
    Access times are not used: most file systems are mounted noatime or relatime."""
    try:
        os.utime(path)
        return True
    except FileNotFoundError:
        return False
    except PermissionError:  # a read-only shared cache: usable, just not reordered
        return path.exists()


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def partial_is_stale(name: str, age_seconds: float, host: str | None = None) -> bool:
    """Whether a file named `name` is a temporary file no live process is writing (pure but for
    the pid check): this host's whose pid is gone, or anyone's untouched for STALE_SECONDS."""
    host = host or _host()
    found = PARTIAL.match(name)
    legacy = LEGACY_PARTIAL.match(name) or LEGACY_PER_PROCESS.search(name)
    if not found and not legacy:
        return False  # not a temporary file: an entry, or something else's
    if age_seconds >= STALE_SECONDS:
        return True
    if found:
        return found["host"] == host and not pid_alive(int(found["pid"]))
    assert legacy is not None  # one of the two matched (checked above)
    return not pid_alive(int(legacy["pid"]))  # written by this machine before hosts were named


def remove_stale_partials(folder: Path) -> list[Path]:
    """Delete the temporary files of writers that died (killed mid-write); returns them."""
    removed = []
    now = time.time()
    for path in _files(folder):
        try:
            age = now - path.stat().st_mtime
        except FileNotFoundError:
            continue
        if partial_is_stale(path.name, age):
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed


def lru_victims(entries: list[tuple[str, int, float]], cap_bytes: float, incoming: int = 0, keep: str | None = None) -> list[str]:
    """Which entries to delete so that they plus `incoming` bytes fit `cap_bytes`: the least
    recently used first, never `keep`. `entries` are (name, bytes, last used). Pure.

        >>> lru_victims([("a", 6, 1.0), ("b", 6, 2.0)], cap_bytes=10, incoming=4, keep="b")
        ['a']
    """
    total = incoming + sum(size for _, size, _ in entries)
    victims = []
    for name, size, _ in sorted(entries, key=lambda e: e[2]):
        if total <= cap_bytes:
            break
        if name == keep:
            continue
        victims.append(name)
        total -= size
    return victims


def evict(folder: Path, cap_bytes: float, incoming: int = 0, keep: Path | None = None) -> list[Path]:
    """Delete the least recently used entries of `folder` until they plus `incoming` bytes fit
    `cap_bytes`; `keep` (the entry being written or just used) stays. Returns what was deleted.
    A process that still maps a deleted entry keeps reading it; the space returns when it lets go."""
    entries = []
    for path in _files(folder):
        if path.suffix != ENTRY_SUFFIX or PARTIAL.match(path.name) or LEGACY_PARTIAL.match(path.name):
            continue
        try:
            stat = path.stat()
        except FileNotFoundError:  # another process evicted it first
            continue
        entries.append((path.name, stat.st_size, stat.st_mtime))
    removed = []
    for name in lru_victims(entries, cap_bytes, incoming, keep.name if keep is not None else None):
        (folder / name).unlink(missing_ok=True)
        removed.append(folder / name)
    return removed


def gib(value: float) -> float:
    return value * 2**30


def _files(folder: Path) -> list[Path]:
    try:
        return [p for p in Path(folder).iterdir() if p.is_file()]
    except FileNotFoundError:
        return []
