"""Command line: ``popproxy run | check-config | demo``."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Awaitable, Callable, Sequence
from functools import partial

import trio

from . import __version__, app, workers
from .addr import HostPort
from .audit import AuditConfig
from .audit import cli as audit_cli
from .config import Config, ConfigError, ListenConfig, MetricsConfig, UpstreamConfig
from .exits import CannotListen, cannot_listen, quiet_on_closed_pipe
from .logs import configure_logging
from .policy.config import parse_policy

__all__ = ["main", "parser"]

# The demo's sample policy: the archive mailbox is read-only, and RETR is
# limited per user, so trying DELE as archive shows a refusal.
DEMO_POLICY = parse_policy({"rules": [
    {"name": "archive-is-read-only", "match": {"users": ["archive"], "commands": ["DELE"]},
     "action": "deny", "message": "this mailbox is read-only"},
    {"name": "retr-per-user", "match": {"commands": ["RETR", "TOP"]},
     "action": "rate_limit", "limit": "30/minute", "per": "user"},
]})


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="popproxy",
        description="A POP3 proxy and mailbox-auditing middlebox.",
        epilog="Signals: SIGTERM drains (stop accepting, let sessions finish up to "
        "limits.drain_timeout); SIGINT (Ctrl-C) stops at once; SIGHUP reloads the "
        "configuration file (an invalid file is rejected and the old one kept).",
    )
    p.add_argument("--version", action="version", version=f"popproxy {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)

    run = sub.add_parser("run", help="run the proxy in the foreground",
                         description="Run the proxy in the foreground with a TOML configuration.")
    run.add_argument("-c", "--config", required=True, metavar="FILE",
                     help="configuration file (TOML); see deploy/popproxy.example.toml")

    check = sub.add_parser("check-config", help="validate a configuration file",
                           description="Validate a configuration file; exit 1 if it is invalid.")
    check.add_argument("file", metavar="FILE", help="configuration file (TOML)")

    demo = sub.add_parser(
        "demo", help="run the proxy in front of a built-in demo mailbox server",
        description="Start a built-in POP3 demo server with sample mailboxes and the proxy "
        "in front of it, and print how to try it. Ctrl-C stops both.",
    )
    demo.add_argument("--listen", default="127.0.0.1:1110", metavar="HOST:PORT",
                      help="where the proxy listens (default: %(default)s)")

    audit_cli.add_parser(sub)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """``popproxy ...``: the exit status (see ``popproxy.exits`` for the
    endings that are not errors of popproxy's own)."""
    args = parser().parse_args(argv)
    return quiet_on_closed_pipe(partial(_main, args))


def _main(args: argparse.Namespace) -> int:
    if args.command == "audit":
        return audit_cli.run(args)
    if args.command == "check-config":
        try:
            config = app.load(args.file)
        except ConfigError as exc:
            print(f"popproxy: {exc}", file=sys.stderr)
            return 1
        for warning in workers.config_warnings(config):
            print(f"popproxy: warning: {warning}", file=sys.stderr)
        print(f"{args.file}: OK")
        return 0
    if args.command == "run":
        try:
            config = app.load(args.config)
        except ConfigError as exc:
            print(f"popproxy: {exc}", file=sys.stderr)
            return 2
        configure_logging(config.log.level, config.log.format)
        if config.server.worker_count() > 1:
            return workers.run(args.config)
        return _run_trio(partial(app.run, config, config_path=args.config))
    if args.command == "demo":
        from .config import parse_address

        try:
            listen = parse_address(args.listen, "--listen")
        except ConfigError as exc:
            print(f"popproxy: {exc}", file=sys.stderr)
            return 2
        configure_logging("info", "console")
        try:
            return _run_trio(partial(_demo, listen))
        except KeyboardInterrupt:
            return 0
    raise AssertionError(args.command)  # argparse rejects anything else


def _run_trio(main: Callable[[], Awaitable[object]]) -> int:
    """``trio.run(main)``: 0, or 1 with one line when an address cannot be
    bound (trio raises that inside exception groups)."""
    failure: CannotListen | None = None
    try:
        trio.run(main)
    except* CannotListen as group:
        failure = cannot_listen(group)
    if failure is not None:
        print(f"popproxy: {failure}", file=sys.stderr)
        return 1
    return 0


async def _demo(listen: HostPort) -> None:
    from .demo import DEMO_USERS, MailStore, serve_demo

    async with trio.open_nursery() as nursery:
        upstream = await nursery.start(serve_demo, MailStore.load_samples(), "127.0.0.1", 0)
        port = upstream[0].socket.getsockname()[1]
        config = Config(
            listeners=(ListenConfig((listen,)),),
            upstream=UpstreamConfig(address=HostPort("127.0.0.1", port)),
            # The audit trail, to the console next to the logs, and the metrics.
            audit=AuditConfig(enabled=True, sink="stdout", fsync="never"),
            metrics=MetricsConfig(HostPort("127.0.0.1", 0)),
            policy=DEMO_POLICY,
        )
        demo_app = app.build(config)

        async def run_proxy(
            task_status: trio.TaskStatus[list[trio.SocketListener]] = trio.TASK_STATUS_IGNORED,
        ) -> None:
            await app.run(config, app=demo_app, task_status=task_status)
            # serve() returns on SIGINT/SIGTERM; the demo server stops with it.
            nursery.cancel_scope.cancel()

        listeners: list[trio.SocketListener] = await nursery.start(run_proxy)
        real = listeners[0].socket.getsockname()
        host, pport = real[0], real[1]
        url_host = f"[{host}]" if ":" in host else host
        user, password = next(iter(DEMO_USERS.items()))
        metrics = demo_app.metrics_address
        users = ", ".join(f"{u}/{p}" for u, p in DEMO_USERS.items())
        print(
            f"""
popproxy demo: the proxy listens on {url_host}:{pport}, in front of a demo
mailbox server on 127.0.0.1:{port}.  Users (user/password): {users}

Try it:
  curl -s pop3://{user}:{password}@{url_host}:{pport}/          # list messages
  curl -s pop3://{user}:{password}@{url_host}:{pport}/1         # retrieve message 1
  python3 -c "import poplib; p = poplib.POP3('{host}', {pport}); p.user('{user}'); \\
p.pass_('{password}'); print(p.stat()); print(b'\\\\n'.join(p.retr(1)[1]).decode()); p.quit()"
  python3 -c "import poplib; p = poplib.POP3('{host}', {pport}); p.user('archive'); \\
p.pass_('archive'); p.dele(1)"                     # refused: archive is read-only

Audit records ("event": "message.retrieve", ...) appear below, between the logs.
Metrics: curl -s http://{metrics}/metrics | grep ^popproxy_

Ctrl-C stops the demo.
""",
            flush=True,
        )
