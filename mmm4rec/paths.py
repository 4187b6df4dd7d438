"""Where the project keeps its caches (one place, one rule).

``$MMM4REC_CACHE`` if set; otherwise ``<repo>/.cache`` when running from a checkout
(editable install), else ``$XDG_CACHE_HOME/mmm4rec`` (``~/.cache/mmm4rec``). It holds
DeepSpeed's JIT-built ops, the bundled samples' shards and the text-vector cache.
"""
from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


def cache_dir() -> Path:
    env = os.environ.get("MMM4REC_CACHE")
    if env:
        return Path(env)
    if (REPO_ROOT / "pyproject.toml").is_file():
        return REPO_ROOT / ".cache"
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "mmm4rec"


def text_cache_dir() -> Path:
    """Text vectors, keyed by content hash and encoder (shared by every build)."""
    return cache_dir() / "text-vectors"
