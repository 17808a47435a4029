"""The host's L1 TLS session cache file (shared memory, cluster/shm_cache.py): its
name and layout from the config. The supervisor creates it before forking; each
node's TLS service maps the same file."""

from __future__ import annotations

from pathlib import Path

from ..config import Config
from .shm_cache import ShmCache


def layout(cfg: Config) -> dict[str, int]:
    entries = max(64, int(cfg.tls.session_cache_size))
    ways = 4
    return {"sets": max(16, entries // ways), "ways": ways, "slot_size": 1024}


def cache_path(cfg: Config) -> Path:
    """Named by its layout: a reload that resizes it gets a new file, never a
    truncated one under old nodes' mappings (SIGBUS)."""
    lay = layout(cfg)
    return cfg.state_dir / f"tls-sessions-{lay['sets']}x{lay['ways']}.shm"


def create_cache(cfg: Config) -> ShmCache | None:
    """The supervisor's call, before it forks: None when nothing shares sessions."""
    if not (cfg.tls.enabled and cfg.tls.session_cache in ("local", "memcache")):
        return None
    path = cache_path(cfg)
    if path.exists():
        try:
            return ShmCache(path, **layout(cfg))  # a reload: keep what the nodes share
        except ValueError:
            pass
    return ShmCache(path, **layout(cfg), create=True)


def open_cache(cfg: Config) -> ShmCache:
    """A node's mapping of the file the supervisor made."""
    return ShmCache(cache_path(cfg), **layout(cfg))
