"""What does sharing limits through Redis cost?  ``memory`` vs ``redis``.

Run from the repository root::

    python -m benchmarks.state_bench            # about two minutes
    python -m benchmarks.state_bench --quick    # a smoke run

One private Dovecot (``tests/dovecot.py``, high-performance login mode), one
private ``redis-server`` (``tests/redis_server.py``, on loopback), and two
proxies in front of the Dovecot, each ``popproxy run`` in a process of its
own, with the same policy:

- the built-in per-user and per-IP session caps (set high: a load test is
  one address and a few users), and a ``rate_limit`` rule on RETR per user
  (high enough never to refuse);
- ``memory``: ``[state] backend = "memory"`` (this process's counts);
- ``redis``: ``[state] backend = "redis"`` on the redis-server: the caps
  are leases, the RETR rule a GCRA step, failed logins counted there.

Rounds interleave the two (their order alternating) so machine noise hits
both alike:

- full sessions: 50 clients doing USER, PASS, STAT, UIDL, RETR 1, QUIT back
  to back for a few seconds; sessions per second and the proxy process's
  CPU per session;
- NOOP: one logged-in session per proxy, blocks of NOOPs; the proxy's CPU
  per NOOP (no shared rule matches NOOP, so Redis must not be asked).

Redis calls per session are counted by the server (``INFO commandstats``:
``EVALSHA`` and ``EVAL`` calls during the session rounds, over the sessions
completed).  The bars (issue 14): redis ≥ 0.85x memory's session rate, NOOP
CPU within 5 %.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
from functools import partial
from pathlib import Path

import trio

from benchmarks._client import Conn, full_session, session_round
from benchmarks._procs import CpuMeter, ProxyProcess, dovecot_with_mail, raise_fd_limit
from benchmarks._profile import record, summarize
from tests.dovecot import ensure_dovecot
from tests.redis_server import RedisServer, ensure_redis

MODES = ("memory", "redis")
RATE_BAR = 0.85
NOOP_BAR = 1.05
RULE = """[[policy.rules]]
name = "retr-per-user"
match = { commands = ["RETR"] }
action = "rate_limit"
limit = "100000/minute"
per = "user"
"""


def log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def state_config(mode: str, redis: RedisServer) -> str:
    if mode == "memory":
        return RULE
    return RULE + f'[state]\nbackend = "redis"\nurl = "{redis.url}"\ntimeout = "250ms"\n'


def redis_calls(redis: RedisServer) -> int:
    """EVALSHA + EVAL calls the server has answered so far."""
    text = redis.command("INFO", "commandstats").decode()
    total = 0
    for line in text.splitlines():
        name, _, fields = line.partition(":")
        if name in ("cmdstat_evalsha", "cmdstat_eval"):
            stats = dict(f.split("=", 1) for f in fields.split(","))
            total += int(stats["calls"])
    return total


async def rate_round(port: int, users: list[tuple[str, str]], seconds: float) -> tuple[int, int]:
    done, errors = await session_round(
        [(u, partial(full_session, "127.0.0.1", port, u, p)) for u, p in users], seconds)
    return done, len(errors)


def client_threads_cpu(pid: int) -> float:
    """CPU seconds of the Redis client's own threads in process ``pid``
    (valkey-glide names them "Valkey-GLIDE ..." and "glide-...")."""
    total = 0.0
    tick = os.sysconf("SC_CLK_TCK")
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            name = Path(f"/proc/{pid}/task/{tid}/comm").read_text().strip().lower()
            stat = Path(f"/proc/{pid}/task/{tid}/stat").read_text()
        except OSError:
            continue  # the thread ended meanwhile
        if "glide" in name:
            fields = stat.rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / tick
    return total


def noop_block(conn: Conn, count: int) -> None:
    sock = conn.sock
    for _ in range(count):
        sock.sendall(b"NOOP\r\n")
        conn.ok_line()


async def _glide_floor(url: str, calls: int) -> float:
    """CPU seconds per call of valkey-glide alone, under trio: one EVALSHA of
    popproxy's script after another, nothing else (the least a question to
    Redis can cost this process)."""
    from popproxy.state import parse_state
    from popproxy.state.redis import open_redis_state
    from popproxy.state.script import SCRIPT_SHA

    config = parse_state({"backend": "redis", "url": url, "timeout": "1s"})
    command = ["EVALSHA", SCRIPT_SHA, "1", "floor:cap:ip:x", "acquire", "", "s", "1000", "30.0"]
    async with open_redis_state(config) as state:
        await state.acquire_lease("ip:x", "s", 1000, 30.0)  # loads the script
        for _ in range(200):
            await state.client.custom_command(command)
        usage = resource.getrusage(resource.RUSAGE_SELF)
        begun = usage.ru_utime + usage.ru_stime
        for _ in range(calls):
            await state.client.custom_command(command)
        usage = resource.getrusage(resource.RUSAGE_SELF)
        return (usage.ru_utime + usage.ru_stime - begun) / calls


def glide_floor(url: str, calls: int) -> float:
    """``_glide_floor`` in a process of its own (so nothing else counts)."""
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.state_bench", "--glide-floor", url, str(calls)],
        capture_output=True, text=True, timeout=300, check=True)
    return float(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer and shorter rounds")
    ap.add_argument("--rounds", type=int, default=None)
    ap.add_argument("--seconds", type=float, default=None, help="per round and mode")
    ap.add_argument("--json", metavar="FILE", help="also write the results here")
    ap.add_argument("--profile", metavar="DIR", type=Path,
                    help="after the rounds, sample each proxy with py-spy during one "
                         "more session round; folded stacks and a summary go to DIR")
    ap.add_argument("--glide-floor", nargs=2, metavar=("URL", "CALLS"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.glide_floor:
        print(trio.run(_glide_floor, args.glide_floor[0], int(args.glide_floor[1])))
        return 0
    rounds = args.rounds or (2 if args.quick else 8)
    seconds = args.seconds or (1.5 if args.quick else 4.0)
    noops = 2000 if args.quick else 5000
    for reason in (ensure_dovecot(), ensure_redis()):
        if reason is not None:
            raise SystemExit(f"benchmark needs Dovecot and redis-server: {reason}")
    raise_fd_limit(8192)
    clients = 50
    users = {f"c{i:03d}": f"c{i:03d}-pw" for i in range(clients)}
    users["noop"] = "noop-pw"
    with contextlib.ExitStack() as stack:
        workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="state-bench-")))
        dovecot = dovecot_with_mail(stack, users, 600)
        redis = RedisServer()
        stack.callback(redis.stop)
        redis.start()
        proxies: dict[str, ProxyProcess] = {}
        for mode in MODES:
            d = workdir / mode
            d.mkdir()
            proxy = ProxyProcess(dovecot.port, d, extra_config=state_config(mode, redis))
            problem = proxy.check_config()
            if problem:
                raise SystemExit(f"{mode}: bad configuration: {problem}")
            proxy.start()
            stack.callback(proxy.stop)
            log(f"{mode}: pid {proxy.pid} on port {proxy.port}")
            proxies[mode] = proxy
        pairs = [(u, p) for u, p in users.items() if u != "noop"]
        for mode in MODES:  # warm-up
            trio.run(rate_round, proxies[mode].port, pairs, 1.0)
        rates: dict[str, list[float]] = {m: [] for m in MODES}
        cpu: dict[str, list[float]] = {m: [] for m in MODES}
        noop_cpu: dict[str, list[float]] = {m: [] for m in MODES}
        errors = dict.fromkeys(MODES, 0)
        calls = sessions = 0
        noop_calls = 0
        glide_noop_cpu = 0.0
        floor_cpu: list[float] = []
        conns = {m: Conn("127.0.0.1", proxies[m].port, timeout=30.0) for m in MODES}
        for conn in conns.values():
            stack.callback(conn.close)
            conn.login("noop", users["noop"])
            noop_block(conn, 500)  # warm-up
        try:
            for r in range(rounds):
                order = MODES if r % 2 == 0 else MODES[::-1]
                for mode in order:
                    meter = CpuMeter(proxies[mode].pid)
                    before = redis_calls(redis)
                    with meter.measure():
                        done, errs = trio.run(rate_round, proxies[mode].port, pairs, seconds)
                    if mode == "redis":
                        calls += redis_calls(redis) - before
                        sessions += done
                    rates[mode].append(done / seconds)
                    cpu[mode].append(meter.cpu / done * 1000 if done else float("nan"))
                    errors[mode] += errs
                    log(f"round {r + 1}/{rounds} {mode}: {done / seconds:,.0f} sessions/s, "
                        f"{cpu[mode][-1]:.2f} ms CPU per session"
                        + (f", {errs} errors" if errs else ""))
                for mode in order:
                    meter = CpuMeter(proxies[mode].pid)
                    before = redis_calls(redis)
                    threads_before = client_threads_cpu(proxies[mode].pid)
                    with meter.measure():
                        noop_block(conns[mode], noops)
                    noop_calls += redis_calls(redis) - before
                    glide_noop_cpu += client_threads_cpu(proxies[mode].pid) - threads_before
                    noop_cpu[mode].append(meter.cpu / noops * 1e6)
                floor_cpu.append(glide_floor(redis.url, 2000))
                log(f"round {r + 1}/{rounds} NOOP CPU: " + ", ".join(
                    f"{m} {noop_cpu[m][-1]:.1f} µs" for m in MODES))
                for proxy in proxies.values():
                    proxy.check_alive()
        except Exception:
            for mode, proxy in proxies.items():
                log(f"--- {mode} proxy's log, last lines:\n{proxy.log_tail(40)}")
            raise
        for conn in conns.values():
            conn.cmd("QUIT")
        if args.profile is not None:
            args.profile.mkdir(parents=True, exist_ok=True)
            for mode in MODES:
                folded = args.profile / f"{mode}.folded"
                with record(proxies[mode].pid, folded):
                    trio.run(rate_round, proxies[mode].port, pairs, seconds)
                (args.profile / f"{mode}.txt").write_text(summarize(folded, top=40))
                log(f"profile of {mode}: {args.profile / (mode + '.txt')}")
    rate = {m: statistics.median(rates[m]) for m in MODES}
    noop = {m: statistics.median(noop_cpu[m]) for m in MODES}
    paired_rate = statistics.median(a / b for a, b in zip(rates["redis"], rates["memory"],
                                                          strict=True))
    paired_noop = statistics.median(a / b for a, b in zip(noop_cpu["redis"], noop_cpu["memory"],
                                                          strict=True))
    print(f"\nShared state in Redis against this process's counts, {clients} clients, "
          f"{rounds} rounds of {seconds:g} s per mode (medians):\n")
    print("| figure | memory | redis | redis / memory | paired | bar |")
    print("| --- | --- | --- | --- | --- | --- |")
    print(f"| full sessions per second | {rate['memory']:,.0f} | {rate['redis']:,.0f} | "
          f"{rate['redis'] / rate['memory']:.2f}x | {paired_rate:.2f}x | ≥ {RATE_BAR}x: "
          + ("met" if rate["redis"] / rate["memory"] >= RATE_BAR else "MISSED") + " |")
    print(f"| proxy CPU per session (ms) | {statistics.median(cpu['memory']):.2f} | "
          f"{statistics.median(cpu['redis']):.2f} | "
          f"{statistics.median(cpu['redis']) / statistics.median(cpu['memory']):.2f}x | — | — |")
    print(f"| proxy CPU per NOOP (µs) | {noop['memory']:.1f} | {noop['redis']:.1f} | "
          f"{noop['redis'] / noop['memory']:.2f}x | {paired_noop:.2f}x | ≤ {NOOP_BAR}x: "
          + ("met" if noop["redis"] / noop["memory"] <= NOOP_BAR else "MISSED") + " |")
    per_session = calls / sessions if sessions else float("nan")
    print(f"| Redis calls per session | — | {per_session:.2f} | — | — | — |")
    print(f"| Redis calls during {rounds * noops:,} NOOPs (lease renewals of the NOOP "
          f"session's caps, every 10 s) | — | {noop_calls} | — | — | — |")
    print(f"| valkey-glide threads' CPU during those NOOPs | — | {glide_noop_cpu * 1e3:.0f} ms "
          f"| — | — | — |")
    floor = statistics.median(floor_cpu) * 1000  # ms per call
    mem_cpu = statistics.median(cpu["memory"])
    print(f"| valkey-glide alone, CPU per EVALSHA (ms, its own process) | — | {floor:.3f} | — | — "
          "| — |")
    red_cpu = statistics.median(cpu["redis"])
    least = mem_cpu + per_session * floor
    own = (red_cpu - least) / per_session * 1000 if per_session else float("nan")
    print(f"\nThe floor: {per_session:.2f} calls a session at {floor * 1000:.0f} µs of CPU each "
          f"for the client library alone put a session at {least:.2f} ms of CPU at least "
          f"({least / mem_cpu:.2f}x memory's {mem_cpu:.2f} ms); measured {red_cpu:.2f} ms, so "
          f"popproxy's own work around a call is about {own:.0f} µs.  Where the proxy's CPU "
          f"is the bound, the session rate can be at most {mem_cpu / least:.2f}x memory's.")
    if any(errors.values()):
        print(f"\nerrors: {errors}")
    if args.json:
        Path(args.json).write_text(json.dumps({
            "rates": rates, "cpu_ms_per_session": cpu, "noop_cpu_us": noop_cpu,
            "errors": errors, "redis_calls_per_session": per_session,
            "redis_calls_during_noops": noop_calls, "glide_cpu_per_call": floor_cpu,
        }, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
