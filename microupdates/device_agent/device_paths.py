"""Mapping of device paths from a recipe to paths on this machine.

An agent started with a device root (for tests and for several simulated
devices on one machine) keeps the whole device file system under that
directory, so `/opt/app` becomes `<root>/opt/app`.
"""

from __future__ import annotations

import logging
import os
import posixpath
from typing import Optional

logger = logging.getLogger(__name__)


def map_device_path(path: str, device_root: Optional[str]) -> str:
    """Return the path on this machine for a device path.

    Without a device root the path is returned unchanged. With one, the
    absolute device path is placed under the root and normalised. A path that
    would then lie outside the root raises ValueError naming the path.
    The check is lexical, so a symbolic link inside the root that points out
    of it is still followed by whoever opens the mapped path.
    """

    if device_root is None:
        return path

    if "\x00" in path:
        raise ValueError(f"device path {path!r} contains a NUL byte")
    if not path.startswith("/"):
        raise ValueError(f"device path {path!r} is not absolute")

    root = posixpath.normpath(os.path.abspath(device_root))
    if root == "/":
        return posixpath.normpath(path)

    mapped = posixpath.normpath(root + path)
    if mapped != root and not mapped.startswith(root + "/"):
        raise ValueError(f"device path {path!r} leads outside the device root {root!r}")
    return mapped
