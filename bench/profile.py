"""`python -m bench --profile WORKLOAD`: sample ftpcluster (supervisor and every
node) with py-spy while one workload runs, and print where the time goes.
cProfile would need hooks inside the node; py-spy attaches from outside and
follows the node processes. Without py-spy this prints a note and exits 0."""

from __future__ import annotations

import argparse
import collections
import datetime
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from . import loadgen
from . import peers as peers_mod
from .procs import raise_nofile
from .workloads import BY_NAME, Settings

RESULTS = Path(__file__).resolve().parent / "results"
_FRAME = re.compile(r"^(?P<fn>.*?) \((?P<file>[^()]*?)(?::(?P<line>\d+))?\)$")


def find_py_spy() -> str | None:
    """$PY_SPY, then PATH, then next to this interpreter (a venv install)."""
    for cand in (os.environ.get("PY_SPY"), shutil.which("py-spy"), str(Path(sys.executable).parent / "py-spy")):
        if cand and os.access(cand, os.X_OK):
            return cand
    return None


def _short(frame: str) -> str:
    m = _FRAME.match(frame.strip())
    if not m:
        return frame.strip()
    path = m["file"]
    for marker in ("site-packages/", "/ftpcluster/", "/lib/python3"):
        if marker in path:
            path = path.split(marker, 1)[1] if marker != "/ftpcluster/" else "ftpcluster/" + path.split(marker, 1)[1]
            break
    return f"{m['fn']} ({path})"


def summarize(folded: Path, top: int = 25) -> str:
    """Self and inclusive sample shares per function from py-spy's raw (folded)
    output: `frame;frame;... count` per line, outermost frame first."""
    own: collections.Counter[str] = collections.Counter()
    incl: collections.Counter[str] = collections.Counter()
    total = 0
    for line in folded.read_text(errors="replace").splitlines():
        stack, _, n = line.rpartition(" ")
        if not stack or not n.isdigit():
            continue
        count = int(n)
        frames = [_short(f) for f in stack.split(";") if f and not f.startswith("process ")]
        if not frames:
            continue
        total += count
        own[frames[-1]] += count
        for f in set(frames):
            incl[f] += count
    if not total:
        return "no samples (is ptrace allowed? py-spy needs root or CAP_SYS_PTRACE)"
    out = [f"{total} samples", "", "self %   function (leaf: where the CPU is)"]
    out += [f"{100 * c / total:6.1f}  {f}" for f, c in own.most_common(top)]
    out += ["", "incl %   function (on the stack)"]
    out += [f"{100 * c / total:6.1f}  {f}" for f, c in incl.most_common(top)]
    return "\n".join(out)


def profile(a: argparse.Namespace) -> int:
    spy = find_py_spy()
    if spy is None:
        print(f"note: --profile {a.profile} skipped: py-spy is not installed (pip install py-spy, or set PY_SPY)")
        return 0
    w = BY_NAME[a.profile]
    if w.name in ("ban_propagation", "ftps_cross_host"):
        print(f"note: --profile {w.name} skipped: it runs on its own two-host pair, not the profiled peer")
        return 0
    raise_nofile(max(4096, 2 * a.idle + 2048))
    base = Path(tempfile.mkdtemp(prefix="ftpcluster-profile-"))
    peer = None
    try:
        files = peers_mod.prepare_files(base, a.big_mb)
        peer = peers_mod.start_ftpcluster(files, a.nodes)
        loadgen.run(loadgen.sessions(peer.host, peer.port, peer.user, peer.password, 32, 1.0))
        s = Settings(quick=a.quick, duration=a.duration, idle_sessions=a.idle, files=files, nodes=a.nodes,
                     base=base, flood_seconds=a.flood_seconds)  # fmt: skip
        RESULTS.mkdir(parents=True, exist_ok=True)
        ts = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
        out = RESULTS / f"profile-{ts}-{w.name}.txt"
        cmd = [spy, "record", "--pid", str(peer.root_pid()), "--subprocesses", "--format", "raw",
               "--rate", "250", "--nonblocking", "--output", str(out)]  # fmt: skip
        log = open(base / "py-spy.log", "wb")
        spy_proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        time.sleep(1.0)  # let it attach to every node
        sample = w.run(peer, s)
        spy_proc.send_signal(signal.SIGINT)
        try:
            spy_proc.wait(30)
        except subprocess.TimeoutExpired:
            spy_proc.kill()
        log.close()
        print(f"{w.title}: {sample.value:.2f} {w.unit} under py-spy; {sample.detail}")
        if not out.exists():
            print("py-spy wrote nothing:\n" + (base / "py-spy.log").read_text(errors="replace")[-2000:])
            return 0
        print(summarize(out))
        print(f"\nfolded stacks: {out} (feed to flamegraph.pl or speedscope)")
        return 0
    finally:
        if peer is not None:
            peer.stop()
        shutil.rmtree(base, ignore_errors=True)
