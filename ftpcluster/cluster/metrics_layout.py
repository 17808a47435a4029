"""The one metrics layout every process of a host computes alike (see metrics_store.py):
derived from the command verbs and the config, so nodes and the supervisor agree
without talking. The supervisor owns the last slot; node N writes its node-table slot.
The verbs come from the caller (the command table is the worker's, a layer above)."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Iterable

from ..config import Config
from .metrics_store import MetricsStore, Registry, default_definitions

SLOTS = 257  # 256 node-table slots + the supervisor's
SUPERVISOR_SLOT = SLOTS - 1


def registry(cfg: Config, verbs: Iterable[str]) -> Registry:
    servers = cfg.memcache.servers if cfg.memcache.enabled else []
    return Registry(default_definitions(verbs, servers))


def store_path(cfg: Config, verbs: Iterable[str]) -> Path:
    """Named by a hash of the layout: a reload that changes it (new memcached servers)
    starts a new file instead of scrambling the one old nodes still write."""
    reg = registry(cfg, verbs)
    digest = hashlib.sha256(repr([(d.name, d.values) for d in reg.defs]).encode()).hexdigest()[:12]
    return cfg.state_dir / f"metrics-{digest}.shm"


def create(cfg: Config, verbs: Iterable[str]) -> MetricsStore:
    verbs = tuple(verbs)
    return MetricsStore(store_path(cfg, verbs), registry(cfg, verbs), SLOTS, create=True)


def open_existing(cfg: Config, verbs: Iterable[str]) -> MetricsStore:
    verbs = tuple(verbs)
    return MetricsStore(store_path(cfg, verbs), registry(cfg, verbs), SLOTS)
