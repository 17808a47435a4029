"""Mutation check: does the suite notice when a safety property of the server breaks?

Each mutation below is a deliberate breakage of one property (drop the ban record's
CRC check, skip the PROXY hook, let `..` through, ...), written as literal
search/replace edits on a source file. For each one, a copy of the repository is
mutated and only the tests named for it run; at least one must fail. A search text
that is no longer in its file is an error (so the list cannot rot silently when the
code moves on: fix the mutation, do not drop it).

    python -m tests.mutations              # all, prints mutation -> catching test
    python -m tests.mutations --list       # names only
    python -m tests.mutations ban-crc ...  # some
    python -m tests.mutations --no-baseline  # skip the unmutated run of the named tests

Not part of `make test` (run it with `make mutate`). CPU heavy: mutations run one
after another, each with only its tests (`-x`: the first failure is the catch).
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Mutation:
    name: str
    what: str
    file: str  # relative to the repo
    edits: tuple[tuple[str, str], ...]  # literal (search, replace); each search must occur
    tests: tuple[str, ...]  # pytest node ids that must catch it


def M(name: str, what: str, file: str, edits: list[tuple[str, str]], tests: list[str]) -> Mutation:
    return Mutation(name, what, file, tuple(edits), tuple(tests))


MUTATIONS: list[Mutation] = [
    M("ban-crc", "ban table reader ignores the record CRC", "ftpcluster/cluster/ban_table.py",
      [("if crc == zlib.crc32(raw[4:]):", "if True:")],
      ["tests/test_ban_table.py::test_torn_record_is_skipped_not_read"]),
    M("ban-expiry", "ban table ignores expiry", "ftpcluster/cluster/ban_table.py",
      [("return self.expires_at is None or self.expires_at > now", "return True")],
      ["tests/test_ban_table.py::test_expired_records_are_reused_and_purged"]),
    M("proxy-not-installed", "nodes start without the PROXY receiver", "ftpcluster/worker/services.py",
      [("proxy=open_proxy(cfg.proxy_protocol, core.loop, metrics),", "proxy=None,")],
      ["tests/test_proxy_live.py::test_header_address_is_the_session_address"]),
    M("proxy-untrusted", "PROXY headers believed from any peer", "ftpcluster/worker/proxy_accept.py",
      [("return any(a in n for n in self.networks)", "return True")],
      ["tests/test_proxy_live.py::test_untrusted_peer_header_is_not_believed"]),
    M("proxy-v2-crc", "PROXY v2 CRC32C TLV not checked", "ftpcluster/worker/proxy_protocol.py",
      [('if crc32c(zeroed) != int.from_bytes(value, "big"):', "if False:")],
      ["tests/test_proxy_protocol.py::test_v2_bad_crc_rejected"]),
    M("data-reuse-off", "protected data connections need not resume any session", "ftpcluster/worker/datatls.py",
      [("if not reused or control is None or not control.resumed_by(sslsock):", "if False:")],
      ["tests/test_ftps.py::test_plain_ftp_tls_data_refused_without_reuse"]),
    M("data-reuse-any-session", "a data connection may resume any session, not the control's",
      "ftpcluster/worker/datatls.py",
      [("if not reused or control is None or not control.resumed_by(sslsock):", "if not reused:")],
      ["tests/test_ftps.py::test_data_connection_with_another_clients_session_is_refused"]),
    M("data-no-fresh-ticket", "no further TLS 1.3 ticket once a data connection used the control's",
      "ftpcluster/worker/datatls.py", [("                new_session_ticket(self.tls)\n", "                pass\n")],
      ["tests/test_ftps.py::test_curl_several_urls_in_one_command"]),
    M("data-newest-session-only", "data connections may resume only the control's newest session",
      "ftpcluster/worker/datatls.py", [("        return secret == self.first or secret in self.secrets\n", "        return secret == newest\n")],
      ["tests/test_ftps.py::test_a_client_may_keep_resuming_an_earlier_session"]),
    M("ban-index-no-reseal", "ban index shards under a retired key are not sealed again (refused after the overlap)",
      "ftpcluster/cluster/ban_sync.py", [("        entries = self._read_index(reseal=True)\n", "        entries = self._read_index()\n")],
      ["tests/test_memcache_trust.py::test_key_rotation_keeps_bans_and_sessions"]),
    M("full-node-answers-421", "a full node keeps taking connections (421) while another node has room",
      "ftpcluster/supervisor/node_process.py", [("        room_elsewhere=room_elsewhere,\n", "        room_elsewhere=None,\n")],
      ["tests/test_limits.py::test_full_node_leaves_connections_to_a_node_with_room"]),
    M("tls13-sessions-stored", "every TLS 1.3 ticket's session is stored in the shared cache (and memcached), evicting ones resumable by id",
      "ftpcluster/worker/tls_native.py", [("            if lib.SSL_SESSION_get_protocol_version(sess) == TLS1_3_VERSION and", "            if False and")],
      ["tests/test_cluster_tls.py::test_only_sessions_resumable_by_id_are_remembered_for_revocation"]),
    M("full-node-never-looks-again", "a node full while no other had room keeps answering 421 after one has room",
      "ftpcluster/worker/full_node.py", [("        if not self.paused:\n            if in_use >= cap:\n                self._look(cap)\n",
                                          "        if not self.paused:\n            pass\n"),
                                         ("            self._next_look = now + REFUSED_LOOK\n            self._look(cap)\n",
                                          "            self._next_look = now + REFUSED_LOOK\n")],
      ["tests/test_limits.py::test_full_node_leaves_connections_to_a_node_with_room"]),
    M("full-node-batch-421", "a full node's accept loop refuses the rest of its batch (421) instead of leaving it queued",
      "ftpcluster/worker/node.py", [("            if self.full.paused:\n                return  # full: the rest", "            if False:\n                return  # full: the rest")],
      ["tests/test_limits.py::test_full_node_counts_handshakes_and_leaves_the_rest_of_the_queue"]),
    M("full-node-table-sessions-only", "the node table's room ignores connections still in their handshake",
      "ftpcluster/supervisor/node_process.py", [("and v.in_use < cap:", "and v.sessions < cap:")],
      ["tests/test_limits.py::test_full_node_counts_handshakes_and_leaves_the_rest_of_the_queue"]),
    M("data-login-session-forgotten", "the login's session is forgotten after a few fresh tickets",
      "ftpcluster/worker/datatls.py", [("        return secret == self.first or secret in self.secrets\n", "        return secret in self.secrets\n")],
      ["tests/test_ftps.py::test_a_client_may_keep_resuming_an_earlier_session"]),
    M("ban-misses-fresh-tickets", "a ban leaves the sessions handed out for data connections (stateful TLS 1.3 tickets) resumable",
      "ftpcluster/worker/datatls.py", [("            if self.on_new is not None:\n                with contextlib.suppress(Exception):  # best effort: never a reason to refuse the data connection\n                    self.on_new(session)\n", "")],
      ["tests/test_cluster_tls.py::test_user_ban_revokes_cached_sessions"]),
    M("data-not-resumed-from", "with stateful TLS 1.3 tickets, data connections may not offer the session the login resumed from",
      "ftpcluster/worker/datatls.py", [("            self.first = resumed_secret(control_tls)\n", "            pass\n")],
      ["tests/test_cluster_tls.py::test_data_connections_may_offer_the_session_the_login_resumed_from"]),
    M("dotdot", "`..` at the top of the home passes the lexical check", "ftpcluster/worker/fs.py",
      [('                if not parts:\n                    raise PathError("path leads outside the home directory")\n'
        "                parts.pop()\n", "                parts.append(part)\n")],
      ["tests/session/test_properties.py::test_resolve_never_escapes"]),
    M("confinement-off", "resolved paths are not checked to stay inside the home", "ftpcluster/worker/fs.py",
      [("        if not self.inside(real):\n", "        if False:\n")],
      ["tests/session/test_paths.py::test_path_escapes_refused"]),
    M("symlink-escape", "confinement checks the lexical path, not where links lead", "ftpcluster/worker/fs.py",
      [("real = os.path.realpath(self.real_of(virtual))", "real = os.path.normpath(self.real_of(virtual))")],
      ["tests/session/test_properties.py::test_known_escapes_refused", "tests/session/test_paths.py::test_path_escapes_refused"]),
    M("upload-in-place", "STOR writes the target in place (no temp file + atomic rename)",
      "ftpcluster/worker/handlers_transfer.py",
      [('temp = "" if in_place else os.path.join(parent, temp_upload_name())', 'temp = ""')],
      ["tests/session/test_transfers.py::test_stor_is_atomic", "tests/test_ftp_commands.py::test_stor_is_atomic"]),
    M("tls-pointer-checks", "SSL_CTX pointer checks skipped", "ftpcluster/worker/tls_native.py",
      [("if lib.SSL_CTX_get_options(ptr) != int(ctx.options):", "if False:"),
       ("if not ok or lib.SSL_CTX_get_options(ptr) != int(ctx.options):", "if False:")],
      ["tests/test_tls_native.py::test_pointer_check_refuses_a_wrong_object"]),
    M("tls-pointer-flip-check", "SSL_CTX pointer: the write-through check skipped", "ftpcluster/worker/tls_native.py",
      [("if not ok or lib.SSL_CTX_get_options(ptr) != int(ctx.options):", "if False:")],
      ["tests/test_tls_native.py::test_pointer_check_refuses_a_wrong_object"]),
    M("max-login-attempts", "max_login_attempts never closes the session", "ftpcluster/worker/handlers_auth.py",
      [("if s.login_failures >= s.settings.max_login_attempts:", "if False:")],
      ["tests/session/test_files.py::test_too_many_failed_logins_close_the_session",
       "tests/test_bans.py::test_rule_fires_and_every_node_refuses_then_permit"]),
    M("read-only", "read-only accounts may write", "ftpcluster/worker/session.py",
      [("if spec.write and self.user is not None and self.user.read_only:", "if False:")],
      ["tests/session/test_paths.py::test_read_only_user"]),
    M("seal-auth", "a sealed value failing authentication opens anyway", "ftpcluster/cluster/session_seal.py",
      [("        except Exception:  # InvalidTag and friends: a miss\n            return None",
        "        except Exception:  # InvalidTag and friends: a miss\n            return b\"\"")],
      ["tests/test_session_seal.py::test_seal_open_and_tamper", "tests/test_session_seal.py::test_any_flipped_bit_is_a_miss"]),
    M("seal-aad", "the seal's associated data (the session id) is not bound", "ftpcluster/cluster/session_seal.py",
      [("encrypt(nonce, plaintext, head + aad)", "encrypt(nonce, plaintext, head)"),
       ("bytes(sealed[HEADER.size + NONCE :]), head + aad)", "bytes(sealed[HEADER.size + NONCE :]), head)")],
      ["tests/test_session_seal.py::test_seal_open_and_tamper"]),
    M("never-list", "addresses on [ban] never are banned like any other", "ftpcluster/cluster/ban_engine.py",
      [("return None if b is None or self.never_ban(ip) else b", "return b"),
       ('if key and not (target != "user" and self.never_ban(ip)):', "if key:")],
      ["tests/test_bans.py::test_never_list_is_never_banned"]),
    M("limits-one-node", "per-host limits count one node's sessions, not the host's", "ftpcluster/cluster/presence.py",
      [("        for region in self._active():\n            off = self._find(region, d, insert=False)",
        "        for region in self._active()[:1]:\n            off = self._find(region, d, insert=False)")],
      ["tests/test_host_limits.py::test_max_connections_per_host_over_nodes",
       "tests/test_host_limits.py::test_max_clients_per_host_and_user"]),
    M("starttls-injection", "plaintext pipelined behind AUTH TLS runs inside the TLS session",
      "ftpcluster/worker/session.py",
      [("        self._lines = LineBuffer(self.settings.max_line)\n"
        "        self._queue.clear()  # sent in the clear behind AUTH TLS: never commands\n", "")],
      ["tests/session/test_tls_negotiation.py::test_plaintext_pipelined_after_auth_tls_is_discarded",
       "tests/test_ftps.py::test_plaintext_pipelined_after_auth_tls_is_discarded"]),
    M("tls-required-control", "[tls] required = control not enforced", "ftpcluster/worker/handlers_auth.py",
      [('return s.settings.tls_required in ("control", "both") and not s.tls_control', "return False")],
      ["tests/session/test_tls_negotiation.py::test_required_control", "tests/test_ftps.py::test_required_control"]),
    M("ftp-bounce", "PORT/EPRT to a third party's address allowed", "ftpcluster/worker/handlers_transfer.py",
      [("    if target != client:\n", "    if False:\n")],
      ["tests/session/test_transfers.py::test_active_mode_no_bounce", "tests/test_ftp_commands.py::test_active_mode_no_bounce"]),
    M("shm-cache-torn", "TLS session cache reads a slot a writer left half-written", "ftpcluster/cluster/shm_cache.py",
      [("            if seq & 1:\n", "            if False:\n")],
      ["tests/test_tls_native.py::test_shm_cache_get_put_expire_and_torn_writes"]),
    M("shm-cache-no-crc", "TLS session cache believes a slot whose bytes fail its CRC", "ftpcluster/cluster/shm_cache.py",
      [("(seq == 0 or zlib.crc32(entry) == crc)", "True")],
      ["tests/test_tls_native.py::test_shm_cache_get_put_expire_and_torn_writes"]),
    M("node-slot-no-crc", "a heartbeat slot is believed when its body fails the CRC", "ftpcluster/supervisor/node_table.py",
      [("self.words[i] == seq and CRC.unpack_from(record)[0] == zlib.crc32(record[CRC.size :])", "self.words[i] == seq")],
      ["tests/test_node_table.py::test_crc_catches_stores_seen_out_of_order"]),
    M("ban-index-prune-race", "an index prune drops a ban published again between its check and its edit",
      "ftpcluster/cluster/ban_sync.py",
      [("self._edit_index(shard, add=set(), drop=drop, recheck=True)", "self._edit_index(shard, add=set(), drop=drop)")],
      ["tests/test_cluster_bans.py::test_index_prune_keeps_a_ban_published_again_meanwhile"]),
    M("revocation-prefetch-race", "a session revoked while a prefetch was reading it comes back into L1",
      "ftpcluster/cluster/tls_store.py",
      [("                if revoked(self.l1, sid):", "                if False:")],
      ["tests/test_cluster_tls.py::test_revocation_racing_a_prefetch_leaves_no_session"]),
    M("kept-listener-blocks-pasv", "kept passive listeners make a new EPSV at the per-host limit fail",
      "ftpcluster/worker/control.py",
      [("node.release_kept(self.client_ip) and node.passive_held[self.client_ip] < limit", "False")],
      ["tests/test_data_channel_abuse.py::test_kept_listeners_give_way_to_a_new_epsv_at_the_per_host_limit"]),
    M("tls-upload-truncation", "a protected upload ended without close_notify is kept as complete",
      "ftpcluster/worker/datatls.py", [("            if self.close_notify:\n", "            if False:\n")],
      ["tests/test_ftps.py::test_tls_upload_without_close_notify_is_not_kept"]),
    M("fifo-upload-blocks", "an upload onto a FIFO is opened (and blocks the loop) instead of refused",
      "ftpcluster/worker/handlers_transfer.py",
      [("    if st is not None and not stat.S_ISREG(st.st_mode):\n", "    if False:\n")],
      ["tests/test_data_channel_abuse.py::test_upload_onto_a_fifo_is_refused_and_the_node_keeps_serving"]),
    M("unfair-transfer", "a transfer whose socket is always ready keeps the event loop for the whole file",
      "ftpcluster/worker/datastream.py", [("            await asyncio.sleep(0)\n", "            pass\n")],
      ["tests/test_loop_fairness.py::test_tls_upload_yields_to_other_sessions"]),
    M("record-mac-off", "records read from memcached are believed without a valid MAC", "ftpcluster/cluster/record_mac.py",
      [("        if not hmac.compare_digest(self._tag(key, head, name, payload), bytes(raw[len(head) : HEAD - 1])):\n"
        "            return None\n", "")],
      ["tests/test_memcache_trust.py::test_forged_and_replayed_log_entries_are_ignored"]),
    M("ban-revokes-no-tls-session", "a user ban leaves the user's cached TLS sessions resumable",
      "ftpcluster/cluster/tls_revoke.py",
      [('    a replica that missed the delete."""\n    ids = set(', '    a replica that missed the delete."""\n    return 0\n    ids = set(')],
      ["tests/test_cluster_tls.py::test_user_ban_revokes_cached_sessions"]),
]


# ------------------------------------------------------------------ running
def copy_repo(dest: Path) -> Path:
    """The tracked and new files of the repo (no .git, venv or caches) under dest/repo."""
    out = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO, capture_output=True, text=True, check=True)
    target = dest / "repo"
    for rel in out.stdout.splitlines():
        src = REPO / rel
        if src.is_file():
            (target / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, target / rel)
    return target


def apply(root: Path, m: Mutation) -> str:
    """Mutate root/m.file; returns the original text. Every search must be found."""
    path = root / m.file
    original = path.read_text()
    text = original
    for search, replace in m.edits:
        if search not in text:
            raise SystemExit(f"mutation {m.name}: search text not found in {m.file} (the code moved; update it):\n{search}")
        text = text.replace(search, replace)
    compile(text, str(path), "exec")  # a mutation is a breakage of behaviour, never a syntax error
    path.write_text(text)
    return original


def run_tests(root: Path, tests: tuple[str, ...], timeout: float) -> tuple[bool, list[str], str]:
    """(all passed, failing node ids, output tail) of a pytest run in the copy."""
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-rfE", "-p", "no:cacheprovider", *tests]
    try:
        r = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        out = (e.stdout or b"").decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
        return False, ["(timed out)"], out[-2000:]
    failed = re.findall(r"^(?:FAILED|ERROR) (\S+)", r.stdout, re.M)
    return r.returncode == 0, failed or ([] if r.returncode == 0 else [f"(pytest exit {r.returncode})"]), r.stdout[-2000:]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("names", nargs="*", help="mutations to run (default: all)")
    ap.add_argument("--list", action="store_true")
    ap.add_argument("--check", action="store_true", help="only check that every search text is still found")
    ap.add_argument("--no-baseline", action="store_true", help="do not first run the named tests unmutated")
    ap.add_argument("--timeout", type=float, default=300, help="seconds per pytest run")
    a = ap.parse_args(argv)
    by_name = {m.name: m for m in MUTATIONS}
    if a.list:
        for m in MUTATIONS:
            print(f"{m.name:28} {m.what}")
        return 0
    unknown = [n for n in a.names if n not in by_name]
    if unknown:
        ap.error(f"unknown mutation(s): {', '.join(unknown)}")
    chosen = [by_name[n] for n in a.names] if a.names else MUTATIONS
    with tempfile.TemporaryDirectory(prefix="ftpcluster-mutate-") as tmp:
        root = copy_repo(Path(tmp))
        for m in chosen:  # every search text present before anything runs
            (root / m.file).write_text(apply(root, m))
        if a.check:
            print(f"{len(chosen)} mutations apply")
            return 0
        if not a.no_baseline:
            tests = tuple(dict.fromkeys(t for m in chosen for t in m.tests))
            ok, failed, tail = run_tests(root, tests, a.timeout * 2)
            if not ok:
                print(f"baseline: the named tests fail without any mutation: {failed}\n{tail}")
                return 2
            print(f"baseline: {len(tests)} named tests pass unmutated")
        rows: list[tuple[str, str, str, float]] = []
        for m in chosen:
            original = apply(root, m)
            t0 = time.monotonic()
            try:
                ok, failed, tail = run_tests(root, m.tests, a.timeout)
            finally:
                (root / m.file).write_text(original)
            verdict = "SURVIVED" if ok else ", ".join(failed)
            rows.append((m.name, m.what, verdict, time.monotonic() - t0))
            print(f"{m.name:28} {verdict}  ({rows[-1][3]:.0f} s)", flush=True)
    width = max(len(r[0]) for r in rows)
    print("\n| mutation | breaks | caught by |\n|---|---|---|")
    for name, what, verdict, _ in rows:
        print(f"| {name:{width}} | {what} | {verdict} |")
    survived = [r[0] for r in rows if r[2] == "SURVIVED"]
    print(f"\n{len(rows) - len(survived)}/{len(rows)} caught" + (f"; SURVIVED: {', '.join(survived)}" if survived else ""))
    return 1 if survived else 0


if __name__ == "__main__":
    sys.exit(main())
