"""`python -m bench [--quick] [--profile WORKLOAD]`: start the peers, run every
workload against each (interleaved, so drift on a shared machine hits all
alike), print the table of medians and ratios, write bench/results/<ts>.json."""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

from . import loadgen
from . import peers as peers_mod
from . import report
from .procs import raise_nofile
from .workloads import BY_NAME, WORKLOADS, Settings, Skip, Workload

RESULTS = Path(__file__).resolve().parent / "results"
# The floor (bench/floor_server.py) runs the login workloads only: what a login costs
# in kernel, event loop and OpenSSL alone, so every run shows how much is ours.
PEERS = ["ftpcluster", "pyftpdlib", "proftpd", peers_mod.FLOOR]
# ftpcluster again at log level warning, for the session workloads only: the
# main peer runs at the default level (info), so the table shows both.
QUIET = peers_mod.QUIET


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    ap.add_argument("--quick", action="store_true", help="1 run, short durations, 64 MiB, 1,000 idle (< 2 min)")
    ap.add_argument("--runs", type=int, help="runs per workload (median taken); default 3, quick 1")
    ap.add_argument("--duration", type=float, help="seconds per session-churn run; default 10, quick 3")
    ap.add_argument("--nodes", type=int, default=os.cpu_count() or 2, help="ftpcluster nodes = pyftpdlib workers")
    ap.add_argument("--big-mb", type=int, help="RETR/STOR file size in MiB; default 256, quick 64")
    ap.add_argument("--idle", type=int, help="idle sessions for the memory workload; default 10000, quick 1000")
    ap.add_argument("--only", help="comma-separated workloads: " + ",".join(BY_NAME))
    ap.add_argument("--flood-seconds", type=float, help="ban_flood seconds per run; default 5, quick 2")
    ap.add_argument("--peers", default=",".join(PEERS),
                    help="comma-separated peers to start; 'floor' is what a login costs in kernel, event loop "
                         "and OpenSSL alone (bench/floor_server.py, sessions and ftps_resumed only)")  # fmt: skip
    ap.add_argument("--profile", metavar="WORKLOAD", choices=sorted(BY_NAME),
                    help="profile ftpcluster under WORKLOAD with py-spy (only that; no table)")  # fmt: skip
    ap.add_argument("--no-nice", action="store_true", help="don't lower the bench's priority")
    ap.add_argument("--keep", action="store_true", help="keep the temp dir (logs, configs)")
    a = ap.parse_args(argv)
    a.runs = a.runs or (1 if a.quick else 3)
    a.duration = a.duration or (3.0 if a.quick else 10.0)
    a.big_mb = a.big_mb or (64 if a.quick else 256)
    a.idle = a.idle or (1000 if a.quick else 10000)
    a.flood_seconds = a.flood_seconds or (2.0 if a.quick else 5.0)
    return a


def warm(peer: peers_mod.Peer) -> None:
    """A second of session churn once started: workers that are still starting,
    verification caches and lazy imports then don't land in the first workload."""
    loadgen.run(loadgen.sessions(peer.host, peer.port, peer.user, peer.password, 32, 1.0))


def start_peers(names: list[str], files: peers_mod.Files, nodes: int, notes: list[str]) -> list[peers_mod.Peer]:
    started = []
    for name in names:
        try:
            if name == "ftpcluster":
                started.append(peers_mod.start_ftpcluster(files, nodes))
            elif name == QUIET:
                started.append(peers_mod.start_ftpcluster(files, nodes, level="warning"))
            elif name == "pyftpdlib":
                started.append(peers_mod.start_pyftpdlib(files, nodes))
            elif name == peers_mod.FLOOR:
                started.append(peers_mod.start_floor(files, nodes))
            elif name == "proftpd":
                why = peers_mod.ensure_proftpd()
                if why:
                    notes.append(f"proftpd skipped: {why}")
                    continue
                started.append(peers_mod.start_proftpd(files))
            else:
                notes.append(f"unknown peer {name!r} ignored")
            if started and started[-1].name == name:
                warm(started[-1])
        except Exception as e:  # a peer that won't start is a note, not a failed bench
            notes.append(f"{name} skipped: could not start: {str(e).strip().splitlines()[-1] if str(e).strip() else e!r}")
    return started


def bench(a: argparse.Namespace) -> int:
    t_start = time.monotonic()
    notes: list[str] = []
    unknown = [n for n in (a.only or "").split(",") if n and n not in BY_NAME]
    if unknown:
        print(f"unknown workload(s): {', '.join(unknown)} (known: {', '.join(BY_NAME)})", file=sys.stderr)
        return 2
    want = [w for w in WORKLOADS if not a.only or w.name in a.only.split(",")]
    nofile = raise_nofile(max(4096, 2 * a.idle + 2048))
    if nofile < a.idle + 1024:
        a.idle = max(100, nofile - 1024)
        notes.append(f"fd limit {nofile}: idle sessions lowered to {a.idle}")
    base = Path(tempfile.mkdtemp(prefix="ftpcluster-bench-"))
    print(f"bench: {'quick' if a.quick else 'full'}; {a.runs} run(s); {a.nodes} nodes/workers; "
          f"{a.big_mb} MiB files; {a.idle} idle sessions; tmp {base}", flush=True)  # fmt: skip
    running: list[peers_mod.Peer] = []
    s = Settings(quick=a.quick, duration=a.duration, idle_sessions=a.idle, nodes=a.nodes, base=base,
                 flood_seconds=a.flood_seconds)  # fmt: skip
    try:
        files = peers_mod.prepare_files(base, a.big_mb)
        names = a.peers.split(",")
        if "ftpcluster" in names and QUIET not in names and any(w.log_levels for w in want):
            names.insert(names.index("ftpcluster") + 1, QUIET)
        running = start_peers(names, files, a.nodes, notes)
        for n in notes:
            print("note:", n, flush=True)
        names = [p.name for p in running]
        if "ftpcluster" not in names:
            print("ftpcluster did not start; nothing to compare", file=sys.stderr)
            return 1
        s.files = files
        if a.idle > s.proftpd_idle_cap and "proftpd" in names and any(w.name == "idle_memory" for w in want):
            notes.append(f"proftpd idle memory measured at {s.proftpd_idle_cap} sessions (a process each)")
        rows = []
        for w in want:
            samples: dict[str, list[float]] = {p.name: [] for p in running}
            details: dict[str, list[dict[str, Any]]] = {p.name: [] for p in running}
            errors: dict[str, str] = {}
            skipped: set[str] = set()
            runs = 1 if w.name == "idle_memory" else a.runs
            for i in range(runs):
                for p in running:
                    if p.name == QUIET and not w.log_levels:
                        continue
                    if p.name == peers_mod.FLOOR and w.name not in peers_mod.FLOOR_WORKLOADS:
                        continue  # it only knows logins
                    if p.name in skipped or (p.name in errors and not samples[p.name]):
                        continue  # failed before: don't spend the time again
                    if not p.alive():
                        errors[p.name] = "server died: " + p.tail(3)
                        continue
                    t0 = time.monotonic()
                    try:
                        sm = w.run(p, s)
                        samples[p.name].append(sm.value)
                        details[p.name].append(sm.detail)
                        if sm.note and f"{w.name}: {p.name}: {sm.note}" not in notes:
                            notes.append(f"{w.name}: {p.name}: {sm.note}")
                        extra = "".join(f" {k}={v}" for k, v in sm.detail.items() if k not in ("before", "during"))
                        print(f"  {w.name:13s} run {i + 1}/{runs} {p.name:10s} {sm.value:10.2f} {w.unit:5s} "
                              f"({time.monotonic() - t0:.1f}s){extra}", flush=True)  # fmt: skip
                    except Skip as e:
                        skipped.add(p.name)
                        notes.append(f"{w.name}: {p.name} not measured: {e}")
                        print(f"  {w.name:13s} {p.name:10s} skipped: {e}", flush=True)
                    except Exception as e:
                        errors[p.name] = f"{type(e).__name__}: {e}"
                        print(f"  {w.name:13s} run {i + 1}/{runs} {p.name:10s} FAILED {errors[p.name]}", flush=True)
            rows.append(report.summarize(w, {k: v for k, v in samples.items() if v}, details, errors))
            for x in w.extra:  # more figures of the same runs, one row each
                got = {k: [float(d[x.key]) for d in ds if d.get(x.key) is not None] for k, ds in details.items()}
                xw = Workload(f"{w.name}.{x.key}", "  " + x.title, x.unit, w.run, x.higher_is_better, x.targets)
                rows.append(report.summarize(xw, {k: v for k, v in got.items() if v}, {}, {}))
            cpu = {k: [d["server_cpu_ms_per_op"] for d in ds if d.get("server_cpu_ms_per_op")] for k, ds in details.items()}
            if any(cpu.values()):  # rate is capped by a shared machine and client; CPU per session is not
                cw = Workload(w.name + "_cpu", f"  server CPU per {w.op} ({w.name})", "ms", w.run, higher_is_better=False,
                              targets=w.cpu_targets)  # fmt: skip
                rows.append(report.summarize(cw, {k: v for k, v in cpu.items() if v}, {}, {}))
        print()
        print(report.table(rows, names))
        if a.runs > 1:
            print("x columns: the median of run-by-run ratios (each run measures every peer back to back)")
        for n in notes:
            print("note:", n)
        ts = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
        out = RESULTS / f"{ts}.json"
        report.write_json(out, {
            "timestamp": ts, "quick": a.quick, "runs": a.runs, "duration_s": a.duration, "nodes": a.nodes,
            "big_mib": a.big_mb, "idle_sessions": a.idle, "peers": names, "notes": notes,
            "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": sys.version.split()[0],
                        "loadavg": os.getloadavg()},
            "workloads": rows, "elapsed_s": round(time.monotonic() - t_start, 1),
        })  # fmt: skip
        print(f"\nwrote {out.relative_to(Path.cwd()) if out.is_relative_to(Path.cwd()) else out} "
              f"({time.monotonic() - t_start:.0f}s)")  # fmt: skip
        return 0
    finally:
        for p in running:
            p.stop()
        for stop in reversed(s.cleanups):
            try:
                stop()
            except Exception as e:  # a fixture that won't stop must not hide the table
                print(f"note: cleanup failed: {e}", file=sys.stderr)
        if a.keep:
            print(f"kept {base}")
        else:
            shutil.rmtree(base, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    a = parse(argv)
    if not a.no_nice:
        try:
            os.nice(5)  # inherited by every peer alike: fair, and kinder to the shared machine
        except OSError:
            pass
    if a.profile:
        from .profile import profile

        return profile(a)
    try:
        return bench(a)
    except KeyboardInterrupt:
        return 130
    except Exception:
        traceback.print_exc()
        return 1


if __name__ == "__main__":
    sys.exit(main())
