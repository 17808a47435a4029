"""The `ftpcluster` command. Names, flags and exit codes are fixed by CONTRACT.md:
errors are one line on stderr; 0 success, 1 failure, 2 bad usage."""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Callable

from . import __version__
from . import config as config_mod
from .durations import DurationError, parse_duration


class CommandError(Exception):
    """A failure to report as one line and exit 1."""


class UsageError(CommandError):
    """Bad usage found after parsing: one line, exit 2."""


def _add_config(p: argparse.ArgumentParser, root: bool = False) -> None:
    # SUPPRESS on sub-commands, so `ftpcluster --config F status` is not reset to None.
    p.add_argument(
        "--config",
        metavar="FILE",
        default=None if root else argparse.SUPPRESS,
        help="TOML config (default ./ftpcluster.toml, /etc/ftpcluster/ftpcluster.toml, embedded)",
    )


def build_parser() -> argparse.ArgumentParser:
    root = argparse.ArgumentParser(prog="ftpcluster", description="Clustered FTP/FTPS server")
    root.add_argument("--version", action="version", version=f"ftpcluster {__version__}")
    _add_config(root, root=True)
    sub = root.add_subparsers(dest="command", required=True)

    p = sub.add_parser("start", help="bind, pre-fork N nodes and supervise them")
    _add_config(p)
    p.add_argument("--nodes", type=int, metavar="N", help="worker nodes (overrides server.nodes)")
    p.add_argument("--daemon", action="store_true", help="detach; return once every node accepts")

    p = sub.add_parser("stop", help="graceful stop")
    _add_config(p)
    p.add_argument("--timeout", default="30s", help="let transfers finish this long (default 30s)")

    p = sub.add_parser("reload", help="re-read config, users and certificates; replace workers")
    _add_config(p)

    p = sub.add_parser("status", help="supervisor, nodes, listeners, memcached")
    _add_config(p)
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("ban", help="ban a host, user or class")
    _add_config(p)
    p.add_argument("kind", choices=["host", "user", "class"])
    p.add_argument("name", nargs="?")
    p.add_argument("--from-file", metavar="FILE", help="ban every name in FILE (one a line, # comments; - = stdin)")
    p.add_argument("--for", dest="duration", metavar="DURATION", help="30s, 10m, 2h, 1d or hh:mm:ss; default permanent")
    p.add_argument("--reason", default="")

    p = sub.add_parser("permit", help="lift a ban everywhere")
    _add_config(p)
    p.add_argument("kind", choices=["host", "user", "class"])
    p.add_argument("name")

    p = sub.add_parser("bans", help="every ban in force")
    _add_config(p)
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("user", help="manage virtual users")
    usub = p.add_subparsers(dest="user_command", required=True)
    pa = usub.add_parser("add", help="add or update a user")
    _add_config(pa)
    pa.add_argument("name")
    pa.add_argument("--home", required=True)
    pa.add_argument("--read-only", action="store_true")
    pa.add_argument("--password-stdin", action="store_true", required=True, help="read the password from stdin")
    pd = usub.add_parser("del", help="remove a user")
    _add_config(pd)
    pd.add_argument("name")
    pp = usub.add_parser("passwd", help="set a user's password (a lost password is reset this way)")
    _add_config(pp)
    pp.add_argument("name")
    pp.add_argument("--password-stdin", action="store_true", required=True, help="read the password from stdin")
    pl = usub.add_parser("list", help="every user, home and access")
    _add_config(pl)
    pl.add_argument("--json", action="store_true")

    p = sub.add_parser("quota", help="disk quotas: bytes and files per user, shared by every host")
    qsub = p.add_subparsers(dest="quota_command", required=True)
    qs = qsub.add_parser("set", help="set a user's quota (in the users file; 0 = none)")
    _add_config(qs)
    qs.add_argument("name")
    qs.add_argument("--bytes", required=True, metavar="SIZE", help="512K, 1M, 2G or bytes; 0 = no byte limit")
    qs.add_argument("--files", type=int, metavar="N", help="at most N files; 0 = no file limit")
    qw = qsub.add_parser("show", help="a user's usage and limits")
    _add_config(qw)
    qw.add_argument("name")
    qw.add_argument("--json", action="store_true")
    qr = qsub.add_parser("rescan", help="count the user's home again and store the result for every host")
    _add_config(qr)
    qr.add_argument("name")

    p = sub.add_parser("cert", help="certificates")
    csub = p.add_subparsers(dest="cert_command", required=True)
    pg = csub.add_parser("generate", help="write a self-signed certificate and key")
    _add_config(pg)
    pg.add_argument("--out", required=True, metavar="DIR")
    pg.add_argument("--ecdsa", action="store_true", help="ECDSA P-256 instead of RSA 2048")

    p = sub.add_parser("key", help="cluster session key")
    ksub = p.add_subparsers(dest="key_command", required=True)
    pk = ksub.add_parser("generate", help="write a new cluster session key")
    _add_config(pk)
    pk.add_argument("--out", metavar="FILE", help="default: [tls] session_key_file")

    p = sub.add_parser("config", help="configuration")
    cfsub = p.add_subparsers(dest="config_command", required=True)
    pc = cfsub.add_parser("check", help="run every check start runs; print the effective values")
    _add_config(pc)
    pc.add_argument("--json", action="store_true")
    pi = cfsub.add_parser("init", help="print a commented configuration with every key and its default")
    _add_config(pi)

    p = sub.add_parser("cluster", help="the cluster as a whole")
    clsub = p.add_subparsers(dest="cluster_command", required=True)
    pk = clsub.add_parser("check", help="from this host: memcached, hosts and their keys, ban propagation, TLS resumption")
    _add_config(pk)
    pk.add_argument("--balancer", metavar="HOST:PORT", default="", help="the balancer's FTP control address (TLS resumption through it)")
    pk.add_argument("--expect-hosts", type=int, default=0, metavar="N", help="fail unless at least N hosts are seen")
    pk.add_argument("--source", default="", metavar="ADDR", help="source address for the FTP probes")
    pk.add_argument("--json", action="store_true")
    return root


# ---------------------------------------------------------------- handlers
def cmd_start(args: argparse.Namespace, cfg: config_mod.Config) -> int:
    from .supervisor.boot import start

    if args.nodes is not None:
        if args.nodes < 1:
            raise CommandError("--nodes must be at least 1")
        cfg.server.nodes = args.nodes
    code = start(cfg, daemon=args.daemon)
    if code == 0 and args.daemon:
        try:
            st = _control(cfg, {"cmd": "status"})["status"]
            print(f"started: supervisor pid {st['supervisor_pid']}, {len(st['nodes'])} nodes accepting on {', '.join(st['listen'])}")
        except (CommandError, KeyError):
            print(f"started: {cfg.server.nodes} nodes accepting on {cfg.server.listen}")  # it runs; only the status read failed
    return code


def _control(cfg: config_mod.Config, request: dict, timeout: float = 10.0) -> dict:
    from .supervisor.control_client import ControlError, call

    try:
        return call(cfg, request, timeout=timeout)
    except ControlError as e:
        raise CommandError(str(e)) from None


def cmd_stop(args: argparse.Namespace, cfg: config_mod.Config) -> int:
    timeout = _duration(args.timeout)
    pid = _pid(cfg)
    _control(cfg, {"cmd": "stop", "timeout": timeout}, timeout=timeout + 10)
    print(f"stopped (supervisor pid {pid})" if pid else "stopped")
    return 0


def _pid(cfg: config_mod.Config) -> str:
    try:
        return (cfg.state_dir / "ftpcluster.pid").read_text().strip()
    except OSError:
        return ""


def cmd_reload(args: argparse.Namespace, cfg: config_mod.Config) -> int:
    reply = _control(cfg, {"cmd": "reload"}, timeout=60)
    if not reply.get("ok", False):
        raise CommandError(reply.get("error", "reload failed"))
    notes = "".join(f"; {n}" for n in reply.get("notes", []))
    print(f"reloaded: generation {reply.get('generation', '?')} accepting; config, users and certificates re-read{notes}")
    return 0


def cmd_status(args: argparse.Namespace, cfg: config_mod.Config) -> int:
    from .supervisor.status_view import render_status

    reply = _control(cfg, {"cmd": "status"})
    status = reply["status"]
    print(json.dumps(status, indent=2) if args.json else render_status(status))
    return 0


def cmd_ban(args: argparse.Namespace, cfg: config_mod.Config) -> int:
    from .cluster.ban_names import BanNameError, validate_ban_name

    if (args.name is None) == (args.from_file is None):
        raise UsageError("ban: give a NAME or --from-file FILE (not both)")
    if args.from_file is not None:
        return _ban_from_file(args, cfg)
    try:
        name = validate_ban_name(args.kind, args.name, cfg)
    except BanNameError as e:
        raise CommandError(str(e)) from None
    duration = _duration(args.duration) if args.duration else None
    reply = _control(cfg, {"cmd": "ban", "kind": args.kind, "name": name, "duration": duration, "reason": args.reason})
    if not reply.get("ok"):
        raise CommandError(reply.get("error", "ban failed"))
    from .durations import format_duration

    span = f"for {format_duration(duration)}" if duration else "permanently"
    print(f"banned {args.kind} {name} {span} {_where(cfg)}")
    return 0


def _where(cfg: config_mod.Config) -> str:
    """Which hosts a ban or permit reaches: those the supervisor last saw in memcached."""
    if not cfg.ban_uses_memcache:
        return "on this host"
    try:
        n = len(_control(cfg, {"cmd": "status"}, timeout=5)["status"].get("cluster", {}).get("hosts", []))
    except (CommandError, KeyError, AttributeError):
        n = 0
    return f"on {n} hosts" if n > 1 else "on this host and every host sharing memcached"


BULK_BYTES = 48 * 1024  # names per control request: well under the supervisor's 64 KB request limit


def _ban_from_file(args: argparse.Namespace, cfg: config_mod.Config) -> int:
    """Thousands of bans in a few requests (each a batch the supervisor applies
    at once), not a process and a round trip per name."""
    from .durations import format_duration

    try:
        text = sys.stdin.read() if args.from_file == "-" else open(args.from_file, encoding="utf-8").read()
    except OSError as e:
        raise CommandError(f"{args.from_file}: {e.strerror}") from None
    names = [n for n in (line.split("#", 1)[0].strip() for line in text.splitlines()) if n]
    if not names:
        raise CommandError(f"{args.from_file}: no names")
    duration = _duration(args.duration) if args.duration else None
    banned, failed, errors, batch, size = 0, 0, [], [], 0
    for i, name in enumerate(names):
        batch.append(name)
        size += len(name) + 4
        if size < BULK_BYTES and i + 1 < len(names):
            continue
        req = {"cmd": "ban", "kind": args.kind, "names": batch, "duration": duration, "reason": args.reason}
        reply = _control(cfg, req, timeout=60)
        if "banned" not in reply:  # refused as a whole (e.g. bans disabled)
            raise CommandError(reply.get("error", "ban failed"))
        banned, failed = banned + int(reply["banned"]), failed + int(reply.get("failed", 0))
        errors += reply.get("errors", [])
        batch, size = [], 0
    for e in errors[:20]:
        print(f"ftpcluster: {e}", file=sys.stderr)
    if failed > 20:
        print(f"ftpcluster: ... {failed - 20} more not banned", file=sys.stderr)
    span = f"for {format_duration(duration)}" if duration else "permanently"
    print(f"banned {banned} of {len(names)} {args.kind}s {span} {_where(cfg)}")
    return 1 if failed else 0


def cmd_permit(args: argparse.Namespace, cfg: config_mod.Config) -> int:
    from .cluster.ban_names import BanNameError, validate_ban_name

    try:
        name = validate_ban_name(args.kind, args.name, cfg)
    except BanNameError as e:
        raise CommandError(str(e)) from None
    reply = _control(cfg, {"cmd": "permit", "kind": args.kind, "name": name})
    if not reply.get("ok"):
        raise CommandError(reply.get("error", "permit failed"))
    if not reply.get("found", True):
        raise CommandError(f"{args.kind} {name} is not banned (see: ftpcluster bans)")
    print(f"permitted {args.kind} {name} {_where(cfg)}")
    return 0


def cmd_bans(args: argparse.Namespace, cfg: config_mod.Config) -> int:
    reply = _control(cfg, {"cmd": "bans"})
    bans = reply.get("bans", [])
    if args.json:
        print(json.dumps(bans, indent=2))
    elif not bans:
        print("no bans in force")
    else:
        import time

        for b in bans:
            exp = "permanent" if b["expires_at"] is None else f"{max(0, int(b['expires_at'] - time.time()))}s left"
            print(f"{b['kind']:5} {b['name']:30} {exp:14} {b['origin']:7} {b.get('reason', '')}")
    return 0


def cmd_user(args: argparse.Namespace, cfg: config_mod.Config) -> int:
    from .users import UserError, add_user, del_user, load_users, set_password

    path = cfg.resolve(cfg.server.users_file)
    live = "running servers use it within 2 s"
    try:
        if args.user_command == "list":
            users = load_users(path)
            rows = [{"name": u.name, "home": u.home, "read_only": u.read_only} for u in users.values()]
            if args.json:
                print(json.dumps(rows, indent=2))
            elif not rows:
                print(f"no users in {path}")
            for r in [] if args.json else rows:
                print(f"{r['name']:24} {'read-only ' if r['read_only'] else 'read-write'} {r['home']}")
            return 0
        if args.user_command in ("add", "passwd"):
            password = sys.stdin.readline().rstrip("\r\n")
            if not password:
                raise CommandError("empty password on stdin")
            if args.user_command == "passwd":
                set_password(path, args.name, password)
                print(f"changed the password of {args.name} in {path}; {live}")
                return 0
            home = os.path.abspath(args.home)  # a command-line path: relative to the current folder
            new = add_user(path, args.name, password, home, args.read_only, owner=cfg.server.user)
            print(f"{'added' if new else 'updated'} user {args.name} (home {home}{', read-only' if args.read_only else ''}) in {path}; {live}")
        else:
            del_user(path, args.name)
            print(f"deleted user {args.name} from {path} (the home folder stays); {live}")
    except (UserError, OSError) as e:
        raise CommandError(f"{e}" if isinstance(e, UserError) else f"{path}: {e.strerror}") from None
    return 0


def cmd_quota(args: argparse.Namespace, cfg: config_mod.Config) -> int:
    from .cluster.quota_store import rescan_usage, show_usage
    from .limits import LimitsError, limits_for
    from .sizes import SizeError, format_size, parse_size
    from .users import UserError, load_users, set_quota

    _quiet_logs()
    path = cfg.resolve(cfg.server.users_file)
    try:
        if args.quota_command == "set":
            try:
                parse_size(args.bytes)
            except SizeError as e:
                raise CommandError(f"--bytes: {e}") from None
            if args.files is not None and args.files < 0:
                raise CommandError("--files: must not be negative")
            set_quota(path, args.name, args.bytes, args.files)
        users = load_users(path)
    except (UserError, OSError) as e:
        raise CommandError(f"{e}" if isinstance(e, UserError) else f"{path}: {e.strerror}") from None
    rec = users.get(args.name)
    if rec is None:
        raise CommandError(f"no such user: {args.name}")
    try:
        lim = limits_for(cfg, rec)
    except LimitsError as e:
        raise CommandError(str(e)) from None
    if args.quota_command == "rescan":
        usage, stored = rescan_usage(cfg, rec.name, rec.home)
        where = "memcached and this host" if cfg.memcache.enabled and stored else "this host"
        if cfg.memcache.enabled and not stored:
            where += " (memcached did not answer: nodes rescan once it does)"
        print(f"rescanned {rec.name}: {usage.used_bytes} bytes in {usage.used_files} files under {rec.home}; stored for {where}")
        return 0
    usage = show_usage(cfg, rec.name, rec.home)
    if args.quota_command == "set":
        b = f"{format_size(lim.quota_bytes)} ({lim.quota_bytes} bytes)" if lim.quota_bytes else "no byte limit"
        f = f"{lim.quota_files} files" if lim.quota_files else "no file limit"
        print(f"quota of {rec.name}: {b}, {f} (in {path}; running servers use it within 2 s; copy the users file to every host)")
        return 0
    row = {"user": rec.name, "used_bytes": usage.used_bytes, "used_files": usage.used_files,
           "limit_bytes": lim.quota_bytes, "limit_files": lim.quota_files, "max_upload_size": lim.max_upload_size,
           "source": usage.source}  # fmt: skip
    if args.json:
        print(json.dumps(row, indent=2))
    else:
        lb = format_size(lim.quota_bytes) if lim.quota_bytes else "unlimited"
        print(f"{rec.name}: {usage.used_bytes} bytes of {lb}, {usage.used_files} files of {lim.quota_files or 'unlimited'} (from {usage.source})")
    return 0


def cmd_cert(args: argparse.Namespace, cfg: config_mod.Config) -> int:
    from .certs import generate_self_signed

    cert, key = generate_self_signed(args.out, ecdsa=args.ecdsa)
    print(f"wrote {cert} and {key}")
    return 0


def cmd_key(args: argparse.Namespace, cfg: config_mod.Config) -> int:
    from .certs import generate_session_key

    from .cluster.session_seal import fingerprint, load_sealer

    out = args.out or str(cfg.resolve(cfg.tls.session_key_file))
    generate_session_key(out)
    print(f"wrote {out} (key fingerprint {fingerprint(load_sealer(out))}); copy the same file to every host, then reload each")
    return 0


def cmd_config(args: argparse.Namespace, cfg: config_mod.Config) -> int:
    from .config_doc import render_init

    if args.config_command == "init":
        sys.stdout.write(render_init())
        return 0
    from .supervisor.preflight import problems

    found = problems(cfg, create=False)
    for p in found:
        print(f"ftpcluster: {p}", file=sys.stderr)
    if args.json:
        print(json.dumps({**cfg.as_dict(), "ok": not found, "problems": found}, indent=2, default=str))
    else:
        from .config_doc import effective_toml

        print(effective_toml(cfg))
    if not args.json:
        source = cfg.path or "the embedded default"
        print(f"# {source}: " + (f"{len(found)} problem(s), see above" if found else "OK, every check start runs passed"))
    return 1 if found else 0


def _quiet_logs() -> None:
    """For commands that talk to memcached themselves: its warnings and debug lines (a
    server down) must not mix into stdout; the command's own lines say what counts."""
    import logging

    import structlog

    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.ERROR),
                        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr))  # fmt: skip


def cmd_cluster(args: argparse.Namespace, cfg: config_mod.Config) -> int:
    from .cluster_check import as_json, render, run

    _quiet_logs()

    results = run(cfg, lambda req: _control(cfg, req), args.balancer, args.expect_hosts, args.source)
    print(json.dumps(as_json(results), indent=2) if args.json else render(results))
    return 0 if all(r.ok for r in results) else 1


def _duration(text: str) -> float:
    try:
        return parse_duration(text)
    except DurationError as e:
        raise CommandError(str(e)) from None


HANDLERS: dict[str, Callable[[argparse.Namespace, config_mod.Config], int]] = {
    "start": cmd_start,
    "stop": cmd_stop,
    "reload": cmd_reload,
    "status": cmd_status,
    "ban": cmd_ban,
    "permit": cmd_permit,
    "bans": cmd_bans,
    "user": cmd_user,
    "quota": cmd_quota,
    "cert": cmd_cert,
    "key": cmd_key,
    "config": cmd_config,
    "cluster": cmd_cluster,
}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        cfg = config_mod.load(args.config)
        return HANDLERS[args.command](args, cfg)
    except UsageError as e:
        print(f"ftpcluster: {e}", file=sys.stderr)
        return 2
    except (CommandError, config_mod.ConfigError) as e:
        print(f"ftpcluster: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 1


if __name__ == "__main__":
    sys.exit(main())
