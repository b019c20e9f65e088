"""The shared disk cache's file discipline: atomic publication, stale temporary files, least-recently-used eviction."""

from __future__ import annotations

import numpy as np


def test_a_reader_of_a_replaced_entry_still_reads_a_complete_file(tmp_path):
    """Two writers of one key: the second rename replaces the first file; a process that mapped
    the first keeps a complete copy, and a new reader gets the second, complete too."""
    from harness import diskcache

    path = tmp_path / "entry.npy"
    first, second = tmp_path / "entry.partial-a-1.npy", tmp_path / "entry.partial-b-2.npy"
    np.save(first, np.arange(1000, dtype=np.int64))
    np.save(second, np.arange(1000, dtype=np.int64))
    diskcache.publish(first, path)
    mapped = np.load(path, mmap_mode="r")
    diskcache.publish(second, path)
    assert mapped.sum() == np.load(path, mmap_mode="r").sum() == 499500
    assert sorted(p.name for p in tmp_path.iterdir()) == ["entry.npy"]


def _dead_pid() -> int:
    import subprocess
    import sys

    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_temporary_files_of_dead_writers_are_removed_and_a_live_writers_kept(tmp_path):
    import os
    import time

    from harness import diskcache

    host, dead = diskcache._host(), _dead_pid()
    names = {
        "entry.npy": False,  # a finished entry
        f"a.partial-{host}-{dead}.npy": True,  # its writer was killed
        f"b.partial-{host}-{os.getpid()}.npy": False,  # its writer (this process) is alive
        "c.partial-otherhost-1.npy": False,  # another machine's writer: only age tells
        "d.partial-otherhost-2.npy": True,  # ...and this one has not been written to for days
        f"e.{dead}.partial.npy": True,  # an earlier version's temporary feature file
        f"0123-32px-ordered-pid{dead}.index": True,  # an earlier version's per-process tf.data copy
        f"0123-32px-ordered-pid{dead}.data-00000-of-00001": True,
    }
    for name in names:
        (tmp_path / name).write_bytes(b"x")
    old = time.time() - diskcache.STALE_SECONDS - 60
    os.utime(tmp_path / "d.partial-otherhost-2.npy", (old, old))
    removed = diskcache.remove_stale_partials(tmp_path)
    assert sorted(p.name for p in removed) == sorted(n for n, stale in names.items() if stale)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(n for n, stale in names.items() if not stale)


def test_lru_victims_go_oldest_used_first_until_the_newcomer_fits():
    from harness.diskcache import lru_victims

    entries = [("a", 4, 3.0), ("b", 4, 1.0), ("c", 4, 2.0)]
    assert lru_victims(entries, cap_bytes=12) == []
    assert lru_victims(entries, cap_bytes=12, incoming=4) == ["b"]
    assert lru_victims(entries, cap_bytes=12, incoming=8) == ["b", "c"]
    assert lru_victims(entries, cap_bytes=0, incoming=4, keep="b") == ["c", "a"]  # kept even past the cap
