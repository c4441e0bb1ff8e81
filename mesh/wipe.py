"""Destroying a profile quickly: the seized-device escape hatch.

Overwrites every file of the profile with random bytes before unlinking it (key file
first: without it the store's sealed envelopes are useless to whoever holds the disk, and
the plaintext inbox goes right after). On SSDs and copy-on-write file systems an
overwrite in place is not guaranteed to reach the old blocks; ``docs/threat-model.md``
says so and recommends full-disk encryption as the real protection.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from mesh.profile import Profile

_CHUNK = 1 << 20


def _shred(path: Path) -> None:
    with contextlib.suppress(OSError):
        size = path.stat().st_size
        with open(path, "r+b", buffering=0) as fh:
            left = size
            while left > 0:
                step = min(left, _CHUNK)
                fh.write(os.urandom(step))
                left -= step
            os.fsync(fh.fileno())
    with contextlib.suppress(OSError):
        path.unlink()


def wipe_profile(profile: Profile) -> list[str]:
    """Shred and remove the profile directory; returns the names of what was destroyed."""
    home = profile.home
    if not home.is_dir():
        return []
    order = [profile.identity_path, profile.store_path,
             profile.store_path.with_name(profile.store_path.name + "-wal"),
             profile.store_path.with_name(profile.store_path.name + "-shm")]
    done: list[str] = []
    for path in order + sorted(p for p in home.rglob("*") if p.is_file() and p not in order):
        if path.is_file() and not path.is_symlink():
            _shred(path)
            done.append(path.name)
        elif path.exists():
            with contextlib.suppress(OSError):
                path.unlink()
    for directory in sorted((p for p in home.rglob("*") if p.is_dir()), reverse=True):
        with contextlib.suppress(OSError):
            directory.rmdir()
    with contextlib.suppress(OSError):
        home.rmdir()
    return done
