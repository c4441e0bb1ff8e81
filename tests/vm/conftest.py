"""The VM tier is slow (a QEMU boot per test): collected only under ``make test-ble-vm``.

``make test`` walks tests/ recursively; without ``PIGEON_VM_TESTS=1`` (set by the make
target) nothing in this directory is collected, so the default suite never boots a VM.
"""

from __future__ import annotations

import os

collect_ignore_glob = [] if os.environ.get("PIGEON_VM_TESTS") == "1" else ["*.py"]
