"""Byte counts of what a device call carries (used by pack_model.sh, run from the repository root)."""
from __future__ import annotations

import os
import subprocess


def du(path: str) -> int:
    """Bytes of a file, or of every file below a folder."""
    if os.path.isfile(path):
        return os.path.getsize(path)
    return sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(path) for f in fs
               if os.path.isfile(os.path.join(r, f)))


def tree_bytes() -> int:
    """Bytes of the working tree that travels with every call: tracked and untracked-not-ignored files."""
    files = subprocess.run(["git", "ls-files", "-z", "-co", "--exclude-standard"], capture_output=True,
                           check=True).stdout.split(b"\0")
    return sum(os.path.getsize(f) for f in files if f and os.path.isfile(f))
