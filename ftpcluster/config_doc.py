"""What every configuration key means, in one place.

`ftpcluster config init` and docs/configuration.md are both rendered from this
table and from the defaults in config.py, so neither can drift from the code: a
test fails when a key exists in one and not the other. Regenerate the reference
page with ``python -m ftpcluster.config_doc > docs/configuration.md``."""

from __future__ import annotations

import dataclasses
import sys
from typing import Any

from . import config as config_mod
from .events import BAN_EVENTS

# (section, key) -> (what it does, the ProFTPD directive it corresponds to or "")
KEYS: dict[str, dict[str, tuple[str, str]]] = {
    "server": {
        "listen": ("Control connections, host:port (`[::]:21` for IPv6). Explicit FTPS via AUTH TLS on the same port.", "Port, DefaultAddress"),
        "implicit_tls_listen": ('Implicit FTPS listener, e.g. "0.0.0.0:990"; "" = none.', "TLSOptions UseImplicitSSL"),
        "passive_ports": ("PASV/EPSV port range of this host, LOW-HIGH; each node owns a slice. Open it in the firewall and, behind a balancer, forward it to this host.", "PassivePorts"),
        "masquerade_address": ('IPv4 address written into PASV replies (the balancer\'s public address; a name is refused: PASV carries four numbers); "" = the address the client connected to.', "MasqueradeAddress"),
        "nodes": ("Worker processes; `start --nodes` overrides.", ""),
        "state_dir": ("Pid file, control socket, shared-memory tables, host id, bans.json. Must be writable by the service user.", "ScoreboardFile, PidFile"),
        "root": ("Default home for users without one; created by `make run`.", "DefaultRoot"),
        "users_file": ("Virtual users (TOML, argon2id hashes). Re-read by a running server within about 2 s of a change.", "AuthUserFile"),
        "anonymous_root": ('"" = no anonymous login; a folder = read-only anonymous FTP there.', "<Anonymous>"),
        "max_login_attempts": ("Failed logins per session before 530 and a close; raises the MaxLoginAttempts ban event.", "MaxLoginAttempts"),
        "idle_timeout": ("Idle control connection: 421 and close.", "TimeoutIdle"),
        "login_timeout": ("Time to log in before 421.", "TimeoutLogin"),
        "data_timeout": ("Data connection set-up; a transfer with no byte moved this long (a slow reader that keeps reading is never cut); a PASV/EPSV port no transfer used this long is closed.", "TimeoutStalled"),
        "no_transfer_timeout": ("Logged in this long without a transfer: 421; 0 = off.", "TimeoutNoTransfer"),
        "max_sessions_per_node": ("421 for sessions beyond this on one node; implicit-TLS handshakes in flight count too. A node whose descriptor limit holds fewer (three per session, 64 spare) admits only those. Nodes accept from one shared queue; a full node stops taking from it while another node of the host has room (per the node table, up to a second old), so 421 comes once no node has room.", "MaxInstances"),
        "max_passive_per_host": ("Passive listeners one client address may hold open on a node (425 beyond), so one account cannot hold the whole range; 0 = no limit.", ""),
        "max_line_length": ("Longer command lines get 500 and are discarded (at least 512).", "CommandBufferSize"),
        "atomic_uploads": ("STOR writes a hidden temporary file renamed on success.", "HiddenStores"),
        "banner": ("Text of the 220 greeting.", "ServerIdent"),
        "user": ('Started as root: bind, then switch to this account before any node forks. Homes created by `user add` belong to it. "" = stay.', "User, Group"),
        "heartbeat_timeout": ("A node silent this long is killed and replaced.", ""),
        "graceful_timeout": ("stop/reload: how long transfers may finish before nodes are killed.", ""),
        "max_connections_per_host": ("Connections per client address over every node of the host; 0 = unlimited.", "MaxConnectionsPerHost"),
        "max_clients_per_host": ("Logged-in sessions per client address; 0 = unlimited.", "MaxClientsPerHost"),
        "max_clients_per_user": ("Logged-in sessions per user; 0 = unlimited.", "MaxClientsPerUser"),
        "max_hosts_per_user": ("Client addresses per logged-in user; 0 = unlimited. Counted per node and summed: one address with sessions on two nodes counts twice, so with N nodes it may refuse early (allow for it, or use max_clients_per_user).", "MaxHostsPerUser"),
    },
    "tls": {
        "enabled": ("FTPS (AUTH TLS and implicit). Needs certificate and private_key.", "TLSEngine"),
        "certificate": ("PEM certificate (chain). `ftpcluster cert generate --out DIR` writes a self-signed one for testing.", "TLSRSACertificateFile, TLSCertificateChainFile"),
        "private_key": ("PEM private key of the certificate.", "TLSRSACertificateKeyFile"),
        "required": ("off | control (USER/PASS need AUTH TLS) | data (transfers need PROT P) | both.", "TLSRequired"),
        "session_cache": ("off | local (this host's shared memory) | memcache (plus sealed sessions in memcached: resumption on every host).", "TLSSessionCache"),
        "session_tickets": ("off | local | cluster (ticket keys derived from session_key_file, the same on every host).", "TLSSessionTickets"),
        "session_key_file": ("Cluster secret that seals cached sessions, derives ticket keys and the MAC keys of everything in memcached (required with [memcache] enabled); the same file on every host. `ftpcluster key generate` writes or rotates it.", "TLSSessionTicketKeys"),
        "require_data_session_reuse": ("A protected data connection must resume its own control connection's TLS session (else 522).", "TLSOptions (without NoSessionReuseRequired)"),
        "session_context": ('TLS session id context; "" = the memcache namespace (all hosts agree).', ""),
        "handshake_timeout": ("A TLS handshake must finish within this.", "TLSTimeoutHandshake"),
        "max_handshakes_per_host": ("Implicit-TLS handshakes in flight per client address on a node (421 beyond); 0 = no limit.", ""),
        "session_lifetime": ("How long a cached session or ticket resumes.", "TLSSessionCache (timeout)"),
        "session_key_overlap": ("After `ftpcluster key generate` rotates the cluster key, the previous key is still accepted this long (sessions, ban records, log entries it sealed or MACed), then refused even if still in the file.", ""),
        "session_cache_size": ("Entries in the host's shared-memory session cache (about 1 KB each).", "TLSSessionCache (size)"),
        "upload_close_notify": ("A protected upload (PROT P) must end with the client's TLS close_notify; one that ends with a bare TCP close or a reset may be truncated (by the network or an attacker), so it gets 426 and nothing is kept. false takes such an end as the end of the file (vsftpd's strict_ssl_read_eof = NO).", ""),
    },
    "memcache": {
        "enabled": ("Share bans, event counts and TLS sessions between hosts. memcached has no authentication: bind it to a private network and firewall it.", "MemcacheEngine"),
        "servers": ("host:port of every memcached server; the same list on every host (order does not matter: ketama).", "MemcacheServers"),
        "replicas": ("Copies written per key; 2 survives the loss of one server.", "MemcacheReplicate"),
        "connect_failures": ("Failures in a row before a server is ejected (then probed).", "MemcacheConnectFailures"),
        "timeout": ("Connect and I/O timeout per operation; also how long a TLS handshake waits for a session from another host before it goes on as a full one.", "MemcacheTimeouts"),
        "namespace": ("Key prefix: two clusters can share memcached servers.", ""),
        "probe_interval": ("How often every process checks each server (`version`, traffic or not): a hung or dead one is skipped within about two intervals, an ejected one taken back once it answers.", "MemcacheEjectionTimeout"),
        "sync_interval": ("How often a supervisor reads the cluster's ban log.", ""),
    },
    "ban": {
        "enabled": ("Ban engine on; `ftpcluster ban` needs it.", "BanEngine"),
        "cache": ("local | memcache (bans and event counts shared through memcached when [memcache] is enabled).", "BanCache"),
        "message": ("Reply text to a banned client; %r reason, %u user, %a address, %c class, %e time left.", "BanMessage"),
        "rules": ("BanOnEvent rules: { event, threshold, window, duration[, message] }; events use ProFTPD's names.", "BanOnEvent"),
        "classes": ('Named network lists for class bans, e.g. { office = ["10.1.0.0/16"] }.', "Class"),
        "never": ("Networks that are never banned (monitoring, the balancer).", ""),
        "table_size": ("Entries in the host's shared-memory ban table.", "BanTable"),
    },
    "proxy_protocol": {
        "enabled": ("Control connections from `trusted` peers start with a PROXY v1/v2 header; bans, limits and logs see the real client.", "ProxyProtocolEngine"),
        "trusted": ("Only these networks may send a PROXY header; other peers count as themselves.", ""),
        "timeout": ("Time to receive the header.", "ProxyProtocolTimeout"),
        "passive": ("Passive data connections also carry a PROXY header (haproxy `send-proxy-v2` on the passive ranges).", ""),
    },
    "log": {
        "level": ("debug | info | warning | error | critical.", "SyslogLevel"),
        "format": ('json | console. With file = "" and stderr a terminal, the console format is used unless the config sets format.', "LogFormat"),
        "file": ('Log file; "" = stderr. USR1 reopens it (logrotate).', "SystemLog"),
        "xferlog": ('Transfer log in the classic xferlog format; "" = none.', "TransferLog"),
        "trace": ('Per-channel levels, e.g. { memcache = "debug", tls = "debug" }.', "Trace"),
    },
    "metrics": {
        "listen": ('Prometheus text format on host:port, e.g. "127.0.0.1:9121"; "" = off.', "PrometheusExporter (mod_prometheus)"),
    },
    "limits": {
        "user_download_rate": ('Bytes/s one user downloads over all their sessions on every host (512K, 1M, 2G; "0" = no limit). Shared through memcached; without it, each host takes its share.', "TransferRate RETR"),
        "user_upload_rate": ("Bytes/s one user uploads over all their sessions on every host.", "TransferRate STOR"),
        "max_upload_size": ("Largest file a user may store (STOR, APPE, STOU; after REST the whole file): 552 before the first byte when ALLO or REST tells the size, else when it is passed; nothing partial is left under the name.", "MaxStoreFileSize"),
        "session_download_rate": ("Bytes/s one session downloads.", "TransferRate (per session)"),
        "session_upload_rate": ("Bytes/s one session uploads.", "TransferRate (per session)"),
        "host_download_rate": ("Bytes/s all downloads of this host together (its nodes share one budget in shared memory).", ""),
        "host_upload_rate": ("Bytes/s all uploads of this host together.", ""),
        "quota_bytes": ("Default disk quota per user, bytes under the home (552 past it); `ftpcluster quota set` sets one user's.", "QuotaLimitTable bytes_in_avail"),
        "quota_files": ("Default quota in files per user; 0 = none.", "QuotaLimitTable files_in_avail"),
        "classes": ('Named sets of the limits above for users with `class = "NAME"` in the users file, e.g. { gold = { user_download_rate = "10M", quota_bytes = "5G" } }.', "Class"),
        "rate_slot": ("Granularity of the cluster rate: each slot's budget is leased piecewise from memcached. A transfer of E seconds moves at most rate x (E + rate_slot); hosts' clocks must agree well within it (NTP).", ""),
        "fallback_hosts": ("Without memcached (or while it is down) a user's rate is split over this many hosts, each host's nodes sharing its part; 0 = as many as last seen in memcached (1 without memcached).", ""),
        "quota_rescan_interval": ("How often a user's usage is recounted from the disk (one host per user); `ftpcluster quota rescan` does it now. 0 = only on demand.", "ftpquota --type=tally --update-records"),
    },
}


def _section_fields(section: str) -> list[dataclasses.Field[Any]]:
    return list(dataclasses.fields(config_mod._SECTIONS[section]))


def all_keys() -> list[tuple[str, str]]:
    """Every (section, key) config.py knows, in declaration order."""
    return [(s, f.name) for s in config_mod._SECTIONS for f in _section_fields(s)]


def _seconds(v: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        if v >= size and v % size == 0:
            return f"{int(v // size)}{unit}"
    if v == 0:
        return "0s"
    return f"{round(v * 1000)}ms"


def toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return str(v)
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(v, list):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{ " + ", ".join(f"{k} = {toml_value(x)}" for k, x in v.items()) + " }" if v else "{}"
    raise TypeError(f"no TOML form for {v!r}")


def default_text(section: str, key: str, value: Any = None) -> str:
    """A value as it is written in the config file (durations as 10m, 250ms)."""
    if value is None:
        value = getattr(getattr(config_mod.Config(), section), key)
    if (section, key) in config_mod._DURATIONS:
        return toml_value(_seconds(float(value)))
    return toml_value(value)


def render_init() -> str:
    """A commented config with every key at its default (`ftpcluster config init`)."""
    out = [
        "# ftpcluster configuration: every key at its default.",
        "# Relative paths are relative to this file's folder. Reference: docs/configuration.md",
        "# Check it with: ftpcluster --config FILE config check",
    ]
    for section in config_mod._SECTIONS:
        out += ["", f"[{section}]"]
        for f in _section_fields(section):
            meaning, proftpd = KEYS[section][f.name]
            note = f" (ProFTPD: {proftpd})" if proftpd else ""
            out.append(f"# {meaning}{note}")
            if section == "ban" and f.name == "rules":
                out.append("rules = [")
                for rule in config_mod.BanConfig().rules:
                    out.append(f"  {toml_value(rule)},")
                out.append("]")
            else:
                out.append(f"{f.name} = {default_text(section, f.name)}")
    return "\n".join(out) + "\n"


def effective_toml(cfg: config_mod.Config) -> str:
    """The values in force, as TOML (`ftpcluster config check`)."""
    out = [f"# effective configuration from {cfg.path or 'the embedded default'}"]
    for section in config_mod._SECTIONS:
        out += ["", f"[{section}]"]
        obj = getattr(cfg, section)
        out += [f"{f.name} = {default_text(section, f.name, getattr(obj, f.name))}" for f in _section_fields(section)]
    return "\n".join(out)


def render_markdown() -> str:
    """The key tables of docs/configuration.md."""
    out = [_MD_HEAD]
    for section in config_mod._SECTIONS:
        out += [f"## [{section}]", "", "| key | default | what it does | ProFTPD |", "|---|---|---|---|"]
        for f in _section_fields(section):
            meaning, proftpd = KEYS[section][f.name]
            default = default_text(section, f.name).replace("|", "\\|")
            out.append(f"| `{f.name}` | `{default}` | {meaning.replace('|', chr(92) + '|')} | {f'`{proftpd}`' if proftpd else '-'} |")
        out.append("")
        extra = _MD_NOTES.get(section)
        if extra:
            out += [extra.strip().replace("{events}", ", ".join(BAN_EVENTS)), ""]
    return "\n".join(out)


_MD_HEAD = """\
# Configuration reference

<!-- Generated by `python -m ftpcluster.config_doc > docs/configuration.md`
     from ftpcluster/config_doc.py and the defaults in ftpcluster/config.py. -->

One TOML file. Every command takes `--config FILE`; without it:
`./ftpcluster.toml` if present, else `/etc/ftpcluster/ftpcluster.toml`, else the
embedded default (everything below, with paths under `./ftpcluster-data`).
Relative paths are relative to the config file's folder. Unknown sections and
keys are errors, so a typo is caught by `ftpcluster config check`, which also
runs every check `start` runs (certificate and key load, session key, users
file readable by the service user, ports parse, state dir writable) and prints
the effective values.

- `ftpcluster config init > ftpcluster.toml` writes this whole table as a
  commented file; `deploy/ftpcluster.example.toml` is an annotated example for
  a host behind a load balancer.
- Durations: `250ms`, `30s`, `10m`, `2h`, `1d`, or ProFTPD's `hh:mm:ss`; a bare
  number is seconds.
- Changes take effect on `ftpcluster reload` (SIGHUP), except `listen` and
  `implicit_tls_listen`, which need a restart. The users file needs neither: a
  running server re-reads it within about 2 s.
"""

_MD_NOTES = {
    "server": """
The users file (`users_file`), managed with `ftpcluster user add|del|passwd|list`:

```toml
[[users]]
name = "alice"
password = "$argon2id$..."   # a hash (argon2id; bcrypt accepted), never plain text
home = "/srv/ftp/alice"      # relative paths: relative to the users file
read_only = false
```
""",
    "memcache": """
## Trust model: memcached

memcached has no authentication: anything that can reach it can read, write
and delete any key. ftpcluster therefore treats it as an untrusted, unreliable
cache. Everything a host writes there and later believes carries a MAC under
the cluster key (`[tls] session_key_file`, the same file on every host): ban
records, permits (a removal record under the ban's key plus a change-log
entry), change-log entries (`banlog:<seq>`), index shards (`banidx:<n>`),
the per-user TLS session lists used to revoke a banned user's sessions and the
host records `cluster check` reads (`host:<id>`, `hosts`) and each user's disk
usage for quotas (`quota:<user>`). The
MAC binds a record to its full key name (namespace included), so a valid record
copied to another key or a later sequence number is refused, as is an edited
one (a changed expiry) or one made under another cluster's key. TLS sessions
are sealed (AES-GCM) under the same key. A value without a valid MAC is ignored
as if it were missing, counted in `ftpcluster_memcache_rejected_total{kind}`
(`ban`, `banlog`, `banidx`, `tlsuser`, `tls`, `host`, `quota`) and logged at most once a minute
with the server it came from. Event counters (memcached `incr`, which cannot
carry a MAC) live under key names that are a keyed hash of event, target and
client, and a counter only ever makes a rule fire for the address or user it
was derived from; the rate counters of `[limits]` likewise are a keyed hash of
direction, user and 100 ms slot, a new name every slot. What is left there: a
deleted usage record is rescanned from the disk, an older one of the same user
put back makes that user's usage look lower or higher until the next rescan, and
incrementing unknown counter keys can at worst slow some user's transfers for
the slot it happens to hit.

So an attacker on the memcached network can at most deny the cache: delete,
evict or garble keys, or stop memcached, which delays or stops what hosts learn
from each other (every host keeps enforcing the bans it has; only a MAC'd
permit lifts a ban, a missing record never does), turns TLS resumption across
hosts into full handshakes, and lowers cluster-wide event counts to per-host
ones. It cannot ban, permit, extend a ban or read a TLS session. What is left:
ban records are MACed, not encrypted, so it can read who is banned and why; it
can list counter keys and increment them, which can only bring forward a rule
for an address that is itself producing those events (it cannot tell which
address a key belongs to without correlating it with that client's traffic);
and it can replay a record it saw under that record's own key until the
record's own expiry, e.g. an old index shard and ban record that bring back a
lifted ban on a host started after the permit. Keep memcached on a private
network anyway (bound to an internal address, UDP off, firewalled to the FTP
hosts): the cache is an availability dependency and its contents are not
secret.

Rotating the cluster key: run `ftpcluster key generate` on one host (the new
key goes first, the previous one stays with a `retired=<unix time>` stamp),
copy the file to every host and `ftpcluster reload` each one within the
overlap. A reloaded host writes under the new key and accepts both, and
rewrites its own bans under the new key at once, and at its next full load any
ban index shard still under a retired key (one no live host's ban touches); a
host not yet reloaded does not accept what reloaded hosts write (it keeps the bans it has and catches up
at its reload). Counter names change with the key, so event counts restart
from zero at the rotation. Hosts running a version without MACs cannot share
bans with hosts running this one: upgrade every host.
""",
    "limits": """
Per user, in the users file, the most specific value wins ("0" lifts a limit
set above): `class = "gold"` picks a table of `classes`, and `download_rate`,
`upload_rate`, `max_upload_size`, `quota_bytes`, `quota_files` set the user's
own. `ftpcluster quota set USER --bytes 2G --files 10000` writes the last two.
Usage (bytes and regular files under the home) is cached in memcached and
moved by every host as files come and go; `ftpcluster quota show USER` and the
client's `SITE QUOTA` show it. Uploads that would pass the quota get 552.
""",
    "ban": """
A rule: `{ event = "MaxLoginAttempts", threshold = 2, window = "10m", duration = "1h" }`:
`threshold` events within `window` ban for `duration`; an optional `message`
overrides `[ban] message`. Events (ProFTPD's BanOnEvent names): {events}.
""",
}


if __name__ == "__main__":
    sys.stdout.write(render_markdown() if "--init" not in sys.argv else render_init())
