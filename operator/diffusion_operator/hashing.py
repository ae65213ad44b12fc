"""Stable hashes of rendered configuration (the pod template's config-hash annotation)."""

from __future__ import annotations

import hashlib
import json
from typing import Any


def stable_hash(value: Any, length: int = 16) -> str:
    """sha256 of the canonical JSON of `value` (key order and whitespace do not matter)."""
    canonical = json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode()).hexdigest()[:length]


def config_hash(configmap_data: dict[str, str]) -> str:
    return stable_hash(configmap_data)
