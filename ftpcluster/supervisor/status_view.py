"""`ftpcluster status` for people: the headline numbers, one line per node."""

from __future__ import annotations

import time
from typing import Any

from ..limits import describe_summary


def _duration(seconds: float) -> str:
    s = int(seconds)
    d, s = divmod(s, 86400)
    h, s = divmod(s, 3600)
    m, s = divmod(s, 60)
    return (f"{d}d" if d else "") + (f"{h}h" if h or d else "") + f"{m}m{s:02d}s"


def render_status(st: dict[str, Any]) -> str:
    nodes = st.get("nodes", [])
    sessions = sum(n.get("sessions", 0) for n in nodes)
    lines = [
        f"supervisor  pid {st['supervisor_pid']}, up {_duration(st.get('uptime', 0))}, "
        f"generation {st.get('generation', 1)}, {len(nodes)}/{st.get('target_nodes', len(nodes))} nodes, "
        f"{sessions} sessions, {st.get('restarts', 0)} restarts" + (f", stopping ({st['stopping']})" if st.get("stopping") else ""),
        "listen      " + ", ".join(st.get("listen", [])) + (
            "  implicit TLS " + ", ".join(st["implicit_tls_listen"]) if st.get("implicit_tls_listen") else ""),
        f"passive     {st.get('passive_ports', '')}",
        "",
        f"{'node':>4}  {'pid':>7}  {'state':10} {'sessions':>8} {'total':>8} {'rejected':>8}  {'passive':12} uptime",
    ]  # fmt: skip
    for n in nodes:
        lines.append(
            f"{n['id']:>4}  {n['pid']:>7}  {n.get('state', ''):10} {n.get('sessions', 0):>8} {n.get('sessions_total', 0):>8}"
            f" {n.get('rejected', 0):>8}  {n.get('passive', ''):12} {_duration(n.get('uptime', 0))}"
        )
    tls = st.get("tls", {})
    if tls.get("enabled"):
        lines.append("")
        lines.append(f"tls         session cache {tls.get('session_cache')}, tickets {tls.get('session_tickets')}"
                     + (f" (fallback: {tls['fallback_reason']})" if tls.get("fallback_reason") else ""))  # fmt: skip
    mc = st.get("memcache", {})
    if mc.get("enabled"):
        lines.append("")
        for s in mc.get("servers", []):
            state = "up" if s.get("up") else "DOWN"
            # the supervisor's own calls; ftpcluster_memcache_errors_total sums every process's
            line = f"memcached   {s['address']:24} {state:5} supervisor errors {s.get('errors', 0)}"
            if s.get("up") and s.get("latency_ms") is not None:
                line += f", latency {s['latency_ms']:.2f} ms"
            if not s.get("up") and s.get("ejected_since"):
                line += ", down since " + time.strftime("%H:%M:%S", time.localtime(s["ejected_since"]))
            if s.get("last_error"):
                line += f", last error: {s['last_error']}"
            lines.append(line)
    cl = st.get("cluster")
    if cl:
        lines.append(f"cluster     host {cl.get('host_id')}, session key {cl.get('key_fingerprint') or '-'}, "
                     f"{len(cl.get('hosts', []))} hosts in memcached")  # fmt: skip
    lim = st.get("limits")
    if lim:
        lines.append(f"limits      {describe_summary(lim)}")
    t = st.get("totals")
    if t:
        lines.append("")
        lines.append(f"totals      {t['sessions_total']} sessions, logins {t['logins_ok']} ok / {t['logins_failed']} failed, "
                     f"{t['transfers']} transfers, {t['bytes_in']} B in, {t['bytes_out']} B out, {t['ban_rejects']} ban rejects")  # fmt: skip
    for key in ("bans",):
        if key in st and isinstance(st[key], dict):
            lines.append(f"{key:11} " + ", ".join(f"{k} {v}" for k, v in st[key].items()))
    return "\n".join(lines)
