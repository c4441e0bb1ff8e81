"""Where a profile lives on disk, and the lock that keeps two nodes off one profile.

One directory per profile (``--home DIR`` or the platform data dir). A running node
holds an exclusive ``flock`` on ``node.lock`` for its whole life; a second process sees
the lock busy and talks to the first over ``control.sock`` instead of opening the store.
Directory mode 0700 and socket mode 0600 keep other local users out.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from dataclasses import dataclass
from pathlib import Path

import platformdirs

APP_NAME = "pigeon"


@dataclass(frozen=True)
class Profile:
    home: Path

    @classmethod
    def resolve(cls, home: str | Path | None) -> Profile:
        if home is None:
            env = os.environ.get("PIGEON_HOME")
            home = env if env else platformdirs.user_data_dir(APP_NAME, appauthor=False)
        return cls(Path(home).expanduser().resolve())

    @property
    def identity_path(self) -> Path:
        return self.home / "identity.key"

    @property
    def store_path(self) -> Path:
        return self.home / "store.sqlite"

    @property
    def lock_path(self) -> Path:
        return self.home / "node.lock"

    @property
    def control_path(self) -> Path:
        return self.home / "control.sock"

    def ensure(self) -> None:
        self.home.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(OSError):
            os.chmod(self.home, 0o700)

    def exists(self) -> bool:
        return self.identity_path.exists()


class ProfileLock:
    """An exclusive, non-blocking lock on a profile; released when the process dies."""

    def __init__(self, profile: Profile) -> None:
        self._path = profile.lock_path
        self._fd: int | None = None

    def try_acquire(self) -> bool:
        try:
            fd = os.open(self._path, os.O_RDWR | os.O_CREAT, 0o600)
        except FileNotFoundError:
            return False  # the profile directory is gone (wiped meanwhile)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            return False
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self._fd = fd
        return True

    def release(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def __enter__(self) -> ProfileLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
