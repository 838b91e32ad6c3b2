"""The head's table of runtime-environment packages, free of IO.

A package is a zip archive named by the hash of its bytes
(``flowcore/runtime_env.py``).  A driver asks whether the head already has
one (``has_package``) before uploading it (``upload_package``), so the same
content crosses the wire once however many jobs use it; nodes fetch it
(``get_package``) the first time they run work that needs it.  Packages stay
for the life of the head.
"""
from __future__ import annotations

from typing import Any


class PackageTable:
    def __init__(self) -> None:
        self.blobs: dict[str, bytes] = {}
        self.uploads: dict[str, int] = {}
        self.fetches: dict[str, int] = {}

    def has(self, h: str) -> bool:
        return h in self.blobs

    def add(self, h: str, blob: bytes) -> str | None:
        """Store an uploaded package; an error text if it is not what its name says."""
        from ..runtime_env import package_hash
        if package_hash(blob) != h:
            return f"package bytes do not match their hash {h}"
        self.uploads[h] = self.uploads.get(h, 0) + 1
        self.blobs.setdefault(h, bytes(blob))
        return None

    def get(self, h: str) -> bytes | None:
        blob = self.blobs.get(h)
        if blob is not None:
            self.fetches[h] = self.fetches.get(h, 0) + 1
        return blob

    def listing(self) -> list[dict[str, Any]]:
        return [{"hash": h, "size": len(b), "uploads": self.uploads.get(h, 0),
                 "fetches": self.fetches.get(h, 0)} for h, b in self.blobs.items()]
