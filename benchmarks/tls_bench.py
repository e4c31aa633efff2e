"""TLS on the client side: client -> proxy (implicit TLS) against client -> Dovecot pop3s.

Run from the repository root::

    python -m benchmarks.tls_bench            # the full run (about a minute)
    python -m benchmarks.tls_bench --quick    # a smoke run
    python -m benchmarks.tls_bench --json tls.json

A test CA from ``trustme`` issues two certificates (``tests/tls_fixtures.py``:
``write_cert_files``), one for Dovecot and one for the proxy.  One private
Dovecot (``tests/dovecot.py``, high-performance login mode) serves implicit
TLS (pop3s) on ``tls_port`` and plaintext on ``port``; the proxy runs as a
separate process (``python -m popproxy run -c FILE``) with a
``[listen] tls = "implicit"`` listener, in front of Dovecot's plaintext port.
So both targets terminate the client's TLS: Dovecot in its ``pop3-login``
process, the proxy in Python (``ssl`` via ``trio.SSLStream``).  The clients
verify the certificate and host name (127.0.0.1) against the test CA; every
session is a full handshake (no session resumption).

Measured DIRECT (client -> Dovecot pop3s) and through the PROXY (client ->
proxy over TLS -> Dovecot in plaintext), interleaved (direct, proxy; then
proxy, direct; ...) so that machine noise hits both alike; medians:

1. RETR throughput of a 20 MiB message over TLS (a fresh session per
   measurement; only the RETR is timed): MB/s (10^6 octets/s) of the
   decrypted raw reply.
2. Full sessions per second, one client back to back: connect, TLS
   handshake, greeting, USER, PASS, STAT, RETR 1, QUIT; also the session
   latency p50.
3. Full sessions per second with 20 concurrent clients (trio, one user
   each), the same session.

Also: the proxy process's CPU per MB and per session while it was measured,
and the load generator's own CPU per session (it shares the machine and
pays for the client side of every handshake, for both targets alike).  No
bar: the figures are reported.

Every loop is bounded in count and in time; everything is on 127.0.0.1 with
ports picked by binding port 0; Dovecot and the proxy are stopped on exit,
Ctrl-C, SIGTERM and errors.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import ssl
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import trio
import trustme

from benchmarks._client import (
    ClientErrors,
    Conn,
    ProtocolFailure,
    full_session,
    session_round,
)
from benchmarks._procs import (
    APP_RUN_LAUNCHER,
    CLI_LAUNCHER,
    CpuMeter,
    ProxyProcess,
    dovecot_extra_config,
)
from benchmarks.run import (
    _sigterm_as_interrupt,
    fmt,
    log,
    make_message,
    median,
    percentile,
)
from tests.dovecot import SAMPLE_MESSAGES, Dovecot, ensure_dovecot
from tests.tls_fixtures import (
    PROXY_IDENTITIES,
    UPSTREAM_IDENTITIES,
    client_ssl_context,
    write_cert_files,
)

__all__ = ["main"]

MIB = 1 << 20
HOST = "127.0.0.1"
BIG_USER, SEQ_USER = "big", "seq"


@dataclass(frozen=True)
class Settings:
    size_mib: int = 20
    retr_rounds: int = 9
    seq_rounds: int = 7
    seq_sessions: int = 40  # per round and target ...
    seq_seconds: float = 15.0  # ... or this long, whichever comes first
    conc_clients: int = 20
    conc_seconds: float = 5.0
    conc_rounds: int = 5
    max_seconds: float = 900.0  # the whole measurement

    @classmethod
    def quick(cls) -> Settings:
        return cls(size_mib=5, retr_rounds=2, seq_rounds=2, seq_sessions=10, seq_seconds=5.0,
                   conc_seconds=1.5, conc_rounds=1, max_seconds=120.0)


@dataclass(frozen=True)
class Target:
    name: str  # "direct" | "proxy"
    port: int


@dataclass
class Results:
    retr_mb_s: dict[str, list[float]] = field(default_factory=lambda: {"direct": [], "proxy": []})
    seq_rate: dict[str, list[float]] = field(default_factory=lambda: {"direct": [], "proxy": []})
    seq_ms: dict[str, list[float]] = field(default_factory=lambda: {"direct": [], "proxy": []})
    conc_rate: dict[str, list[float]] = field(default_factory=lambda: {"direct": [], "proxy": []})
    conc_errors: dict[str, int] = field(default_factory=lambda: {"direct": 0, "proxy": 0})
    error_examples: list[str] = field(default_factory=list)
    client_cpu_ms: dict[str, list[float]] = field(
        default_factory=lambda: {"direct": [], "proxy": []})
    proxy_cpu: dict[str, dict[str, float]] = field(default_factory=dict)
    tls: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


@dataclass
class Env:
    settings: Settings
    dovecot: Dovecot
    proxy: ProxyProcess
    context: ssl.SSLContext
    users: dict[str, str]
    conc_users: list[str]
    deadline: float
    results: Results = field(default_factory=Results)

    @property
    def targets(self) -> tuple[Target, Target]:
        return Target("direct", self.dovecot.tls_port), Target("proxy", self.proxy.port)

    def ordered(self, r: int) -> tuple[Target, Target]:
        d, p = self.targets
        return (d, p) if r % 2 == 0 else (p, d)

    def meter(self) -> CpuMeter:
        return CpuMeter(self.proxy.pid)

    def out_of_time(self, what: str, done: int, of: int) -> bool:
        if time.monotonic() <= self.deadline:
            return False
        self.results.notes.append(f"{what}: stopped after {done} of {of} rounds at the time bound")
        return True


def measuring(meter: CpuMeter, t: Target) -> contextlib.AbstractContextManager[None]:
    return meter.measure() if t.name == "proxy" else contextlib.nullcontext()


def connect(env: Env, t: Target, timeout: float = 30.0) -> Conn:
    return Conn(HOST, t.port, timeout=timeout, tls=env.context)


# --------------------------------------------------------------------------
# Scenario 1: RETR throughput over TLS
# --------------------------------------------------------------------------


def _retr(env: Env, t: Target, scratch: bytearray) -> tuple[float, int]:
    conn = connect(env, t, timeout=60.0)
    try:
        conn.login(BIG_USER, env.users[BIG_USER])
        octets, seconds = conn.retr_raw(1, scratch)
        conn.cmd("QUIT")
    finally:
        conn.close()
    if octets < env.settings.size_mib * MIB:
        raise ProtocolFailure(f"{t.name}: RETR gave only {octets} octets")
    return octets / seconds / 1e6, octets


def bench_retr(env: Env) -> None:
    s, res = env.settings, env.results
    scratch = bytearray(1 << 20)
    for t in env.targets:  # warm-up: page cache, Dovecot's caches, the proxy's code
        _retr(env, t, scratch)
    meter = env.meter()
    octets = 0
    for r in range(s.retr_rounds):
        for t in env.ordered(r):
            with measuring(meter, t):
                mbps, got = _retr(env, t, scratch)
            if t.name == "proxy":
                octets += got
            res.retr_mb_s[t.name].append(mbps)
        log(f"RETR {s.size_mib} MiB round {r + 1}/{s.retr_rounds}: direct "
            f"{res.retr_mb_s['direct'][-1]:,.0f}, proxy {res.retr_mb_s['proxy'][-1]:,.0f} MB/s")
        if env.out_of_time("RETR", r + 1, s.retr_rounds):
            break
    res.proxy_cpu["retr"] = {"cpu_s": meter.cpu, "wall_s": meter.wall,
                             "ms_per_mb": meter.cpu / (octets / 1e6) * 1000 if octets else 0.0}


# --------------------------------------------------------------------------
# Scenario 2: one client, full sessions back to back
# --------------------------------------------------------------------------


def _session(env: Env, t: Target, user: str) -> None:
    """Connect, handshake, greeting, USER, PASS, STAT, RETR 1, QUIT."""
    conn = connect(env, t)
    try:
        conn.login(user, env.users[user])
        conn.cmd("STAT")
        conn.cmd_multi("RETR 1")
        conn.cmd("QUIT")
    finally:
        conn.close()


def bench_sequential(env: Env) -> None:
    s, res = env.settings, env.results
    for t in env.targets:  # warm-up
        for _ in range(3):
            _session(env, t, SEQ_USER)
    meter = env.meter()
    sessions = 0
    for r in range(s.seq_rounds):
        for t in env.ordered(r):
            times: list[float] = []
            stop = time.monotonic() + s.seq_seconds
            c0 = time.process_time()
            with measuring(meter, t):
                t_round = time.perf_counter()
                for _ in range(s.seq_sessions):
                    t0 = time.perf_counter()
                    _session(env, t, SEQ_USER)
                    times.append(time.perf_counter() - t0)
                    if time.monotonic() > stop:
                        break
                elapsed = time.perf_counter() - t_round
            res.client_cpu_ms.setdefault(f"seq_{t.name}", []).append(
                (time.process_time() - c0) / len(times) * 1000)
            if t.name == "proxy":
                sessions += len(times)
            res.seq_rate[t.name].append(len(times) / elapsed)
            res.seq_ms[t.name] += [x * 1000 for x in times]
        log(f"sequential round {r + 1}/{s.seq_rounds}: direct {res.seq_rate['direct'][-1]:.1f}, "
            f"proxy {res.seq_rate['proxy'][-1]:.1f} sessions/s")
        env.proxy.check_alive()
        if env.out_of_time("sequential", r + 1, s.seq_rounds):
            break
    res.proxy_cpu["sequential"] = {
        "cpu_s": meter.cpu, "wall_s": meter.wall,
        "ms_per_session": meter.cpu / sessions * 1000 if sessions else 0.0,
    }


# --------------------------------------------------------------------------
# Scenario 3: concurrent clients
# --------------------------------------------------------------------------


async def _concurrent_round(
    env: Env, t: Target, users: Sequence[str], seconds: float
) -> tuple[int, list[str]]:
    """Sessions completed within ``seconds`` by one client per user; errors."""
    return await session_round(
        [(f"{t.name} {user}", partial(full_session, HOST, t.port, user, env.users[user],
                                      tls=env.context, uidl=False))
         for user in users],
        seconds,
    )


def bench_concurrent(env: Env) -> None:
    s, res = env.settings, env.results
    users = env.conc_users[: s.conc_clients]
    for t in env.targets:  # warm-up
        trio.run(_concurrent_round, env, t, users, min(1.0, s.conc_seconds))
    meter = env.meter()
    sessions = 0
    for r in range(s.conc_rounds):
        for t in env.ordered(r):
            c0 = time.process_time()
            with measuring(meter, t):
                done, errors = trio.run(_concurrent_round, env, t, users, s.conc_seconds)
            if done:
                res.client_cpu_ms.setdefault(f"conc_{t.name}", []).append(
                    (time.process_time() - c0) / done * 1000)
            if t.name == "proxy":
                sessions += done
            res.conc_rate[t.name].append(done / s.conc_seconds)
            res.conc_errors[t.name] += len(errors)
            res.error_examples += errors[: max(0, 10 - len(res.error_examples))]
            extra = f", {len(errors)} errors" if errors else ""
            log(f"{len(users)} clients round {r + 1}/{s.conc_rounds} {t.name}: "
                f"{done / s.conc_seconds:,.1f} sessions/s{extra}")
            env.proxy.check_alive()
        if env.out_of_time("concurrent", r + 1, s.conc_rounds):
            break
    res.proxy_cpu["concurrent"] = {
        "cpu_s": meter.cpu, "wall_s": meter.wall,
        "ms_per_session": meter.cpu / sessions * 1000 if sessions else 0.0,
    }


# --------------------------------------------------------------------------
# Set-up, report
# --------------------------------------------------------------------------


def tls_facts(env: Env) -> None:
    """The protocol and cipher each target negotiates with the load generator."""
    for t in env.targets:
        conn = connect(env, t)
        try:
            conn.ok_line()
            sock = conn.sock
            assert isinstance(sock, ssl.SSLSocket)
            cipher = sock.cipher()
            env.results.tls[t.name] = (
                f"{sock.version()} {cipher[0] if cipher else '?'}")
            conn.cmd("QUIT")
        finally:
            conn.close()


@contextlib.contextmanager
def environment(s: Settings, launcher: Sequence[str]) -> Iterator[Env]:
    reason = ensure_dovecot()
    if reason is not None:
        raise RuntimeError(f"benchmark needs Dovecot: {reason}")
    conc_users = [f"c{i:03d}" for i in range(s.conc_clients)]
    users = {BIG_USER: "big-Secret1", SEQ_USER: "seq-Secret2"}
    users.update({u: f"{u}-pw" for u in conc_users})
    with contextlib.ExitStack() as stack:
        workdir = Path(stack.enter_context(
            tempfile.TemporaryDirectory(prefix="popproxy-tls-bench-")))
        workdir.chmod(0o755)  # Dovecot's processes read the certificate files
        ca = trustme.CA(organization_name="popproxy tls_bench")
        upstream_cert = write_cert_files(ca, workdir, "dovecot", UPSTREAM_IDENTITIES)
        proxy_cert = write_cert_files(ca, workdir, "proxy", PROXY_IDENTITIES)
        context = client_ssl_context(ca)
        dovecot = Dovecot(
            users, ssl_cert=upstream_cert.cert, ssl_key=upstream_cert.key,
            verify_ca=upstream_cert.ca, max_userip_connections=100,
            extra_config=dovecot_extra_config(4 * s.conc_clients + 32),
        )
        stack.callback(dovecot.stop)
        dovecot.start()
        dovecot.deliver(BIG_USER, make_message(s.size_mib * MIB, "tls-big"))
        for user in (SEQ_USER, *conc_users):
            dovecot.deliver(user, SAMPLE_MESSAGES[0])
        log(f"Dovecot on 127.0.0.1: plaintext {dovecot.port}, pop3s {dovecot.tls_port} "
            f"(started in {dovecot.startup_seconds:.2f}s)")
        proxy_dir = workdir / "proxy"
        proxy_dir.mkdir()
        proxy = ProxyProcess(
            dovecot.port, proxy_dir, max_sessions=1000, launcher=launcher,
            listen_extra=(f'tls = "implicit"\ncert = "{proxy_cert.cert}"\n'
                          f'key = "{proxy_cert.key}"\n'),
            probe_tls=context,
        )
        problem = proxy.check_config()
        if problem:
            raise RuntimeError(f"popproxy check-config refused the TLS config: {problem}")
        stack.callback(proxy.stop)
        proxy.start()
        log(f"proxy pid {proxy.pid}: implicit TLS on 127.0.0.1:{proxy.port} -> "
            f"Dovecot plaintext {dovecot.port} (config {proxy.config_path})")
        env = Env(s, dovecot, proxy, context, users, conc_users,
                  deadline=time.monotonic() + s.max_seconds)
        yield env
        proxy.check_alive()
        lines = proxy.log_lines()
        if lines:
            env.results.notes.append(f"the proxy logged {len(lines)} lines, the last: "
                                     f"{lines[-1][:300]}")


def rows(s: Settings, res: Results) -> list[list[str]]:
    out: list[list[str]] = []

    def row(figure: str, d: float, p: float, digits: int) -> None:
        out.append([figure, fmt(d, digits), fmt(p, digits), f"{p / d:.2f}x" if d else "n/a"])

    n = len(res.retr_mb_s["proxy"])
    row(f"RETR {s.size_mib} MiB over TLS (MB/s, median of {n})",
        median(res.retr_mb_s["direct"]), median(res.retr_mb_s["proxy"]), 0)
    n = len(res.seq_rate["proxy"])
    row(f"Sessions/s, 1 client sequential (median of {n} rounds)",
        median(res.seq_rate["direct"]), median(res.seq_rate["proxy"]), 1)
    d_ms, p_ms = res.seq_ms["direct"], res.seq_ms["proxy"]
    out.append([f"Sequential session latency p50 / p99 (ms, {len(p_ms)} each)",
                f"{percentile(d_ms, 50):.2f} / {percentile(d_ms, 99):.2f}",
                f"{percentile(p_ms, 50):.2f} / {percentile(p_ms, 99):.2f}",
                f"+{percentile(p_ms, 50) - percentile(d_ms, 50):.2f} ms p50"])
    n = len(res.conc_rate["proxy"])
    errs = sum(res.conc_errors.values())
    row(f"Sessions/s, {s.conc_clients} concurrent clients (median of {n} rounds"
        + (f"; {res.conc_errors['direct']} / {res.conc_errors['proxy']} errors" if errs else "")
        + ")", median(res.conc_rate["direct"]), median(res.conc_rate["proxy"]), 1)
    for key, label in (("seq", "sequential"), ("conc", "concurrent")):
        d, p = res.client_cpu_ms.get(f"{key}_direct", []), res.client_cpu_ms.get(f"{key}_proxy", [])
        if d and p:
            row(f"Load generator CPU per session, {label} (ms)", median(d), median(p), 2)
    return out


def render(table: Sequence[Sequence[str]]) -> str:
    head = ("Figure", "Direct: Dovecot pop3s", "Proxy (TLS) → Dovecot", "Proxy / direct")
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] * len(head)) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in table]
    return "\n".join(lines)


def render_cpu(res: Results) -> str:
    lines = ["| Proxy CPU while measured | Wall (s) | CPU (s) | Busy (one core) | Per unit |",
             "|---|---|---|---|---|"]
    for name, c in res.proxy_cpu.items():
        per = (f"{c['ms_per_mb']:.2f} ms per MB" if "ms_per_mb" in c
               else f"{c['ms_per_session']:.2f} ms per session")
        busy = c["cpu_s"] / c["wall_s"] if c["wall_s"] else 0.0
        lines.append(f"| {name} | {c['wall_s']:.2f} | {c['cpu_s']:.2f} | {busy:.0%} | {per} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.tls_bench",
                                 description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("--quick", action="store_true", help="smoke run: fewer rounds, 5 MiB")
    ap.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    ap.add_argument("--launcher", choices=("cli", "app"), default="cli",
                    help="start the proxy with `popproxy run -c FILE` (cli, the default) or "
                    "through popproxy.app.run (app: policy engine and metrics observer too)")
    args = ap.parse_args(argv)
    s = Settings.quick() if args.quick else Settings()
    launcher = CLI_LAUNCHER if args.launcher == "cli" else APP_RUN_LAUNCHER
    started = time.monotonic()
    failed: list[str] = []
    try:
        with _sigterm_as_interrupt(), environment(s, launcher) as env:
            tls_facts(env)
            for name, bench in (("retr", bench_retr), ("sequential", bench_sequential),
                                ("concurrent", bench_concurrent)):
                log(f"--- {name}")
                try:
                    bench(env)
                except (*ClientErrors, RuntimeError) as exc:
                    log(f"{name} FAILED: {exc!r}")
                    env.results.notes.append(f"{name} failed: {exc!r}")
                    failed.append(name)
                env.proxy.check_alive()
            res = env.results
    except KeyboardInterrupt:
        print("interrupted; Dovecot and the proxy were stopped", file=sys.stderr)
        return 130
    except BaseExceptionGroup as group:  # from inside a trio nursery
        if group.subgroup(KeyboardInterrupt) is None:
            raise
        print("interrupted; Dovecot and the proxy were stopped", file=sys.stderr)
        return 130
    except (RuntimeError, OSError) as exc:  # set-up failed: Dovecot or the proxy
        print(f"TLS benchmark set-up failed: {exc}", file=sys.stderr)
        return 2
    mode = "quick" if args.quick else "full"
    print(f"\n## popproxy TLS on the client side ({mode}; proxy started with "
          f"{'popproxy run' if args.launcher == 'cli' else 'popproxy.app.run'}; "
          f"run took {time.monotonic() - started:.0f}s)\n")
    print(f"Negotiated: direct {res.tls.get('direct', '?')}; proxy {res.tls.get('proxy', '?')}. "
          "Certificates and host name verified; a full handshake per session.\n")
    print(render(rows(s, res)))
    print("\n" + render_cpu(res))
    for note in res.notes:
        print(f"\nNote: {note}")
    if res.error_examples:
        print("\nErrors (examples): " + "; ".join(res.error_examples))
    if args.json:
        doc: dict[str, Any] = {"mode": mode, "launcher": args.launcher, "settings": asdict(s),
                               "results": asdict(res), "failed": failed}
        Path(args.json).write_text(json.dumps(doc, indent=2) + "\n")
        print(f"\nwrote {args.json}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
