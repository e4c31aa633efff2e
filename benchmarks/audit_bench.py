"""What does the audit trail cost?  RETR throughput and session rate, audit on vs off.

Run from the repository root::

    python -m benchmarks.audit_bench             # about three minutes
    python -m benchmarks.audit_bench --quick     # a smoke run
    python -m benchmarks.audit_bench --fsync always --json audit.json
    python -m benchmarks.audit_bench --checkpoints   # signed checkpoints on vs off

``--checkpoints`` compares two audited proxies instead: the audit as
above, against the same audit with signed checkpoints (an Ed25519 key,
``checkpoint_records = 1000``, ``checkpoint_interval = "60s"`` and a
``checkpoint_path`` copy), bar 0.97x.  It also times one checkpoint
signature (the note over origin, seq and hash).

One private Dovecot (``tests/dovecot.py``, high-performance login mode) and,
in this process, two proxies in front of it, each assembled by ``app.build``
(operational logs at warning level, metrics, policy): one without audit, and
one with the audit trail as ``popproxy run`` configures it
(``sink = "file"``, ``hash_chain = true``, ``fsync = "session"`` unless
``--fsync``; the file is in a temporary directory on the local disk).  The
clients run in a separate process (``--client ...``), so they do not share
this interpreter with the proxies.  Each round measures the arms in two
halves each, in the order off/on/on/off (then on/off/off/on, ...), so that
machine noise and drift hit both alike; the figures are medians over
rounds, their ratio is the verdict ("paired": the median of the per-round
ratios, shown too).

1. RETR throughput: one logged-in session RETRs a large message repeatedly.
2. Session rate: concurrent clients doing full sessions (USER, PASS, STAT,
   UIDL, RETR 1, QUIT) back to back; about ten audit records per session.

Also reported: this process's CPU time per session and per MiB (both proxies
live here; only one is measured at a time), and that the audit file written
during the run verifies.  The bar: audit on within 10% of audit off.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import trio

from benchmarks._client import Conn, full_session
from benchmarks._procs import REPO_ROOT, dovecot_extra_config
from popproxy.audit import AuditConfig, AuditTrail, open_audit, verify_files
from popproxy.audit._chain import rotated_files
from popproxy.audit._checkpoint import checkpoint_record
from popproxy.audit._note import Signer
from popproxy.audit._verify import verify_trail
from popproxy.config import HostPort
from popproxy.logs import configure_logging
from tests.dovecot import SAMPLE_MESSAGES, Dovecot, ensure_dovecot
from tests.proxy_fixtures import start_proxy

MIB = 1 << 20
BAR = 0.10
CHECKPOINT_BAR = 0.03


@dataclass(frozen=True)
class Settings:
    rounds: int = 25  # a round's on/off ratio varies by +-8 % on a busy 2-core VM
    size_mib: int = 20
    retrs: int = 3  # per half round and arm: 120 MiB a round, about a third of a second
    clients: int = 8
    sessions: int = 25  # per client, half round and arm: about a second a round
    fsync: str = "session"
    commands: str = "all"
    checkpoints: bool = False  # compare audit + checkpoints (on) with the audit (off)

    @classmethod
    def quick(cls, fsync: str = "session", commands: str = "all",
              checkpoints: bool = False) -> Settings:
        return cls(rounds=3, size_mib=5, retrs=2, clients=4, sessions=15, fsync=fsync,
                   commands=commands, checkpoints=checkpoints)

    @property
    def bar(self) -> float:
        return CHECKPOINT_BAR if self.checkpoints else BAR

    @property
    def names(self) -> tuple[str, str]:
        return ("no checkpts", "checkpoints") if self.checkpoints else ("audit off", "audit on")


@dataclass
class Arm:
    name: str
    port: int
    retr_mb_s: list[float] = field(default_factory=list)
    retr_cpu_s_per_mib: list[float] = field(default_factory=list)
    sessions_s: list[float] = field(default_factory=list)
    cpu_ms_per_session: list[float] = field(default_factory=list)


# --------------------------------------------------------------------------
# Client side (a separate process)


def client_retr(port: int, user: str, password: str, count: int) -> dict[str, float]:
    conn = Conn("127.0.0.1", port, timeout=120)
    scratch = bytearray(1 << 20)
    try:
        conn.login(user, password)
        octets = 0
        seconds = 0.0
        for _ in range(count):
            got, took = conn.retr_raw(1, scratch)
            octets += got
            seconds += took
        conn.cmd("QUIT")
    finally:
        conn.close()
    return {"octets": octets, "seconds": seconds}


async def client_sessions(port: int, user: str, password: str, clients: int,
                          sessions: int) -> dict[str, float]:
    async def one_client() -> None:
        for _ in range(sessions):
            await full_session("127.0.0.1", port, user, password)

    t0 = time.perf_counter()
    with trio.fail_after(300):
        async with trio.open_nursery() as nursery:
            for _ in range(clients):
                nursery.start_soon(one_client)
    return {"sessions": clients * sessions, "seconds": time.perf_counter() - t0}


def run_client(argv: Sequence[str]) -> int:
    mode, port, user, password, *rest = argv
    if mode == "retr":
        result = client_retr(int(port), user, password, int(rest[0]))
    else:
        result = trio.run(client_sessions, int(port), user, password, int(rest[0]),
                          int(rest[1]))
    print(json.dumps(result))
    return 0


async def in_client(*argv: object) -> dict[str, float]:
    done = await trio.run_process(
        [sys.executable, "-m", "benchmarks.audit_bench", "--client", *map(str, argv)],
        capture_stdout=True, cwd=str(REPO_ROOT),
    )
    result: dict[str, float] = json.loads(done.stdout)
    return result


# --------------------------------------------------------------------------
# Proxy side (this process)


async def start(nursery: trio.Nursery, upstream: HostPort, trail: AuditTrail | None) -> int:
    """A proxy as ``app.build`` makes it (logs, metrics, policy), plus the trail if given,
    attached as ``app.run`` attaches it."""
    running = await start_proxy(nursery, upstream)
    # The fixture's own observer keeps every event (message data too): not here.
    running.proxy.observers.remove(running.observe)
    if trail is not None:
        running.proxy.observers.insert(0, trail.observe)
        running.proxy.admission.append(lambda peer: trail.refusal())
    return running.port


def audit_config(path: Path, s: Settings, signer: Signer | None = None) -> AuditConfig:
    """The audit as ``popproxy run`` runs it from a file; with ``signer``,
    checkpoints every 1,000 records and 60 s, copied beside the trail."""
    config = AuditConfig(enabled=True, sink="file", path=path, hash_chain=True, fsync=s.fsync,
                         commands=s.commands)
    if signer is None:
        return config
    return replace(config, signer=signer, checkpoint_records=1000, checkpoint_interval=60.0,
                   checkpoint_path=path.with_name("audit.checkpoints"))


async def bench(dovecot: Dovecot, audit_path: Path, s: Settings,
                signer: Signer | None) -> tuple[Arm, Arm]:
    upstream = HostPort(dovecot.host, dovecot.port)
    trail = open_audit(audit_config(audit_path, s, signer if s.checkpoints else None))
    assert trail is not None
    plain: AuditTrail | None = None
    if s.checkpoints:
        # The arm to beat is the audit without checkpoints, in a file of its own.
        plain = open_audit(audit_config(audit_path.with_name("plain.jsonl"), s))
        assert plain is not None
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(trail.write_behind)  # as popproxy.app.run runs the trail
            if plain is not None:
                await nursery.start(plain.write_behind)
            off = Arm("off", await start(nursery, upstream, plain))
            on = Arm("on", await start(nursery, upstream, trail))
            await rounds(dovecot, s, off, on)
            nursery.cancel_scope.cancel()
    finally:
        trail.close()
        if plain is not None:
            plain.close()
    return off, on


def time_signature(signer: Signer, count: int = 2000) -> dict[str, float]:
    """One checkpoint record, signed (the note and the Ed25519 signature), in µs."""
    times = []
    for i in range(count):
        t0 = time.perf_counter()
        checkpoint_record(signer, "bench.example.org/popproxy", 1000 + i, "ab" * 32,
                          "2026-12-05T12:00:00.000000Z")
        times.append(time.perf_counter() - t0)
    times.sort()
    return {"median_us": times[count // 2] * 1e6, "p99_us": times[int(count * 0.99)] * 1e6,
            "max_us": times[-1] * 1e6}


async def halves(order: Sequence[Arm], count: str, *args: object) -> dict[str, list[float]]:
    """Run the client ``args`` against each arm in ``order``; per arm, the sums
    of ``count`` (octets or sessions), client seconds and this process's CPU."""
    sums = {arm.name: [0.0, 0.0, 0.0] for arm in order}
    for arm in order:
        cpu = time.process_time()
        got = await in_client(args[0], arm.port, *args[1:])
        total = sums[arm.name]
        total[0] += got[count]
        total[1] += got["seconds"]
        total[2] += time.process_time() - cpu
    return sums


async def rounds(dovecot: Dovecot, s: Settings, off: Arm, on: Arm) -> None:
    big_pw, small_pw = dovecot.users["alice"], dovecot.users["bob"]
    for arm in (off, on):  # warm up: Dovecot's caches, our code paths
        await in_client("retr", arm.port, "alice", big_pw, 1)
        await in_client("sessions", arm.port, "bob", small_pw, s.clients, 2)
    gc.freeze()  # as popproxy.app.run does once the proxy is built
    for r in range(s.rounds):
        # Each arm's share of a round comes in two halves, in the order
        # A B B A (B A A B in the next round): a drift of the machine's speed
        # during the round then weighs on both arms alike.
        first, second = (off, on) if r % 2 == 0 else (on, off)
        order = (first, second, second, first)
        retr = await halves(order, "octets", "retr", "alice", big_pw, s.retrs)
        sess = await halves(order[::-1], "sessions", "sessions", "bob", small_pw,
                            s.clients, s.sessions)
        for arm in (off, on):
            octets, seconds, cpu = retr[arm.name]
            arm.retr_mb_s.append(octets / seconds / 1e6)
            arm.retr_cpu_s_per_mib.append(cpu / (octets / MIB))
            sessions, seconds, cpu = sess[arm.name]
            arm.sessions_s.append(sessions / seconds)
            arm.cpu_ms_per_session.append(cpu / sessions * 1000)
        print(f"round {r + 1}/{s.rounds}: RETR MB/s off {off.retr_mb_s[-1]:.1f} "
              f"on {on.retr_mb_s[-1]:.1f}; sessions/s off {off.sessions_s[-1]:.1f} "
              f"on {on.sessions_s[-1]:.1f}", file=sys.stderr, flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--client"]:
        return run_client(argv[1:])
    p = argparse.ArgumentParser(prog="python -m benchmarks.audit_bench",
                                description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--quick", action="store_true", help="fewer rounds, smaller sizes")
    p.add_argument("--fsync", choices=("always", "session", "never"), default="session")
    p.add_argument("--commands", choices=("all", "messages"), default="all",
                   help="the audit's `commands` setting (default: all)")
    p.add_argument("--checkpoints", action="store_true",
                   help="compare the audit with signed checkpoints against the audit without")
    p.add_argument("--json", metavar="FILE", help="also write the results here")
    args = p.parse_args(argv)
    s = (Settings.quick(args.fsync, args.commands, args.checkpoints) if args.quick
         else Settings(fsync=args.fsync, commands=args.commands, checkpoints=args.checkpoints))
    # The operational logs stay on but quiet, as `popproxy run` sets them up
    # with log level "warning": alike in both arms.
    configure_logging("warning", "json")
    reason = ensure_dovecot()
    if reason is not None:
        print(f"audit_bench: no Dovecot: {reason}", file=sys.stderr)
        return 2
    line = b"0123456789abcdefghijklmnopqrstuvwxyz" * 2 + b"\r\n"
    big = (b"Subject: big\r\nMessage-ID: <big@bench>\r\n\r\n"
           + line * (s.size_mib * MIB // len(line)))
    dovecot = Dovecot(extra_config=dovecot_extra_config(4 * s.clients + 8),
                      max_userip_connections=1000)
    with dovecot, tempfile.TemporaryDirectory(prefix="popproxy-audit-bench-") as tmp:
        dovecot.reset_mailbox("alice", [big])
        dovecot.reset_mailbox("bob", SAMPLE_MESSAGES)
        audit_path = Path(tmp) / "audit.jsonl"
        signer = Signer.generate("bench.example.org/popproxy")
        off, on = trio.run(bench, dovecot, audit_path, s, signer)
        files = [*rotated_files(audit_path), audit_path]
        contents = [(str(f), f.read_bytes()) for f in files]
        result = verify_files(contents)
        verified = result.ok
        audit_bytes = sum(f.stat().st_size for f in files)
        signed = ""
        if s.checkpoints:
            copy = audit_path.with_name("audit.checkpoints")
            report_signed = verify_trail(contents, verifiers=[signer.verifier],
                                         shipped=[(str(copy), copy.read_bytes())])
            chain = report_signed.chains[0]
            signed = (f"; {chain.checkpoints} checkpoints, "
                      + ("all verify, " if report_signed.ok else "DO NOT VERIFY, ")
                      + f"{chain.tail} records after the last")
            verified = verified and report_signed.ok
    report = summarize(s, off, on, verified, result.records, audit_bytes, signed,
                       time_signature(signer) if s.checkpoints else None)
    print(report["text"])
    if args.json:
        Path(args.json).write_text(json.dumps(report["data"], indent=2) + "\n")
    return 0 if report["data"]["pass"] else 1


def paired(off: Sequence[float], on: Sequence[float]) -> float:
    """The median of the per-round on/off ratios (robust to drift between rounds)."""
    return statistics.median(b / a for a, b in zip(off, on, strict=True))


def summarize(s: Settings, off: Arm, on: Arm, verified: bool, records: int,
              audit_bytes: int, signed: str = "",
              signature: dict[str, float] | None = None) -> dict[str, Any]:
    med = statistics.median
    bar = s.bar
    retr_ratio = med(on.retr_mb_s) / med(off.retr_mb_s)
    sess_ratio = med(on.sessions_s) / med(off.sessions_s)
    ok = retr_ratio >= 1 - bar and sess_ratio >= 1 - bar and verified
    rows = [
        ("RETR throughput (MB/s)", med(off.retr_mb_s), med(on.retr_mb_s), retr_ratio,
         paired(off.retr_mb_s, on.retr_mb_s)),
        ("Session rate (sessions/s)", med(off.sessions_s), med(on.sessions_s), sess_ratio,
         paired(off.sessions_s, on.sessions_s)),
    ]
    what = ("checkpoints = the audit plus signed checkpoints (Ed25519, every 1000 records "
            "and 60 s, copied to a second file); the other arm is the audit alone; "
            if s.checkpoints else "")
    off_name, on_name = s.names
    lines = [
        f"{what}audit = file sink, hash chain, fsync {s.fsync}, commands {s.commands}; "
        f"{s.rounds} rounds of off/on/on/off halves, "
        f"medians; RETR {s.size_mib} MiB x {s.retrs} per half; sessions {s.clients} clients "
        f"x {s.sessions} per half",
        f"{'':28}{off_name:>12}{on_name:>12}{'on/off':>10}{'paired':>8}  bar (on/off)",
    ]
    for name, a, b, ratio, pair in rows:
        verdict = "PASS" if ratio >= 1 - bar else "MISS"
        lines.append(f"{name:28}{a:12.1f}{b:12.1f}{ratio:10.3f}{pair:8.3f}  "
                     f">= {1 - bar:.2f} {verdict}")
    lines += [
        f"{'proxy CPU per session (ms)':28}{med(off.cpu_ms_per_session):12.3f}"
        f"{med(on.cpu_ms_per_session):12.3f}",
        f"{'proxy CPU per MiB RETR (ms)':28}{med(off.retr_cpu_s_per_mib) * 1000:12.3f}"
        f"{med(on.retr_cpu_s_per_mib) * 1000:12.3f}",
        f"audit file: {records} records, {audit_bytes / 1e6:.1f} MB, hash chain "
        + ("verifies" if verified else "DOES NOT VERIFY") + signed,
    ]
    if signature is not None:
        lines.append(f"one checkpoint signature (note + Ed25519): median "
                     f"{signature['median_us']:.0f} µs, p99 {signature['p99_us']:.0f} µs, "
                     f"max {signature['max_us']:.0f} µs")
    data = {"settings": asdict(s), "off": asdict(off), "on": asdict(on),
            "retr_ratio": retr_ratio, "session_ratio": sess_ratio,
            "retr_paired": rows[0][4], "session_paired": rows[1][4], "records": records,
            "audit_bytes": audit_bytes, "verified": verified, "pass": ok,
            "signature": signature}
    return {"text": "\n".join(lines), "data": data}


if __name__ == "__main__":
    sys.exit(main())
