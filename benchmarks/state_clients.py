"""Which Redis client for popproxy's shared state: coredis or valkey-glide?

Run from the repository root (both clients installed in the venv; the one
popproxy does not depend on with ``pip install``)::

    python -m benchmarks.state_clients            # about half a minute
    python -m benchmarks.state_clients --quick    # a smoke run

One private ``redis-server`` (``tests/redis_server.py``) on loopback; each
client is measured in a process of its own (so neither's threads or
imports colour the other's figures), under ``trio.run`` and nothing else:

* latency of one EVALSHA of popproxy's own script (``popproxy/state/state.lua``,
  the ``take`` operation on one GCRA key, the call every shared rate limit
  makes), one call at a time: p50 and p99;
* throughput: 50 concurrent trio tasks calling it, calls/s, and the client
  process's CPU time per call (the machine has two cores: CPU is what a
  worker gives up to Redis);
* whether it really runs under trio: the call happens inside ``trio.run``,
  ``sniffio`` says "trio", and no asyncio event loop object exists in the
  process afterwards (found through ``gc``), with the threads it started;
* the fault that matters most to a proxy: Redis frozen (SIGSTOP, so the TCP
  connection stays up and nothing answers): does ``trio.move_on_after(0.2)``
  get the caller out in time, and after SIGCONT is the next reply the right
  one (no reply of the abandoned call handed to the next caller)?

Prints a table; ``--json FILE`` writes the figures.  Nothing is asserted.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import resource
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import trio

from popproxy.state.script import SCRIPT, SCRIPT_SHA

# coredis twice: as installed, and with its "optimized" mode (runtime
# validations off), to give it its best case.
CLIENTS = ("coredis", "coredis-optimized", "valkey-glide")
# And popproxy's own layer over the chosen client (RedisState.take: the
# timeout scope, the circuit, argument formatting, reply parsing).
ROWS = (*CLIENTS, "popproxy RedisState")
CONCURRENCY = 50


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _args(i: int) -> tuple[list[str], list[str]]:
    # One GCRA key per task, a limit far above what the run sends: every call
    # is admitted and writes, as a real rate-limited RETR does.
    return [f"bench:rl:{i}"], ["take", "", "0", repr(1e-9), repr(1e9 * 1e-9), "1"]


Call = Callable[[list[str], list[str]], Awaitable[Any]]


async def _measure(call: Call, sequential: int, per_task: int) -> dict[str, Any]:
    keys, args = _args(0)
    for _ in range(50):  # warm-up; loads the script
        await call(keys, args)
    lat: list[float] = []
    for _ in range(sequential):
        t0 = time.perf_counter()
        await call(keys, args)
        lat.append(time.perf_counter() - t0)
    lat.sort()

    async def worker(i: int) -> None:
        k, a = _args(i)
        for _ in range(per_task):
            await call(k, a)

    cpu0, t0 = _cpu(), time.perf_counter()
    with trio.fail_after(120):
        async with trio.open_nursery() as nursery:
            for i in range(CONCURRENCY):
                nursery.start_soon(worker, i)
    wall, cpu = time.perf_counter() - t0, _cpu() - cpu0
    total = CONCURRENCY * per_task
    return {
        "p50_us": statistics.median(lat) * 1e6,
        "p99_us": lat[int(len(lat) * 0.99) - 1] * 1e6,
        "calls_per_s": total / wall,
        "cpu_us_per_call": cpu / total * 1e6,
    }


async def _fault(call: Call, redis_pid: int) -> dict[str, Any]:
    """Freeze Redis, time out one call, thaw it, check the next reply is ours."""
    keys = ["bench:fault"]
    await call(keys, ["release", "", "nobody"])
    os.kill(redis_pid, signal.SIGSTOP)
    try:
        t0 = time.perf_counter()
        with trio.move_on_after(0.2) as scope:
            # This reply (1 lease released: 0) would be handed to the next
            # caller by a client that loses track of abandoned requests.
            await call(keys, ["acquire", "", "s1", "5", "60"])
        out_after = time.perf_counter() - t0
    finally:
        os.kill(redis_pid, signal.SIGCONT)
    t1 = time.perf_counter()
    result: Any = None
    error = ""
    with trio.move_on_after(5) as recover:
        try:
            result = await call(keys, ["release", "", "s2"])
        except Exception as exc:  # reported, not handled
            error = f"{type(exc).__name__}: {exc}"[:120]
            with trio.move_on_after(5):
                result = await call(keys, ["release", "", "s2"])
    return {
        "timed_out": scope.cancelled_caught,
        "out_after_ms": out_after * 1e3,
        "next_call_ms": (time.perf_counter() - t1) * 1e3,
        "next_call_error": error or None,
        # "release s2" of a set holding at most s1: 0 is right.
        "next_reply_right": not recover.cancelled_caught and _as_int(result) == 0,
    }


def _as_int(value: Any) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def _under_trio() -> dict[str, Any]:
    import sniffio

    gc.collect()
    loops = [o for o in gc.get_objects() if isinstance(o, asyncio.AbstractEventLoop)]
    try:  # OS threads (a native core's threads are not in threading.enumerate())
        tasks = Path("/proc/self/task").iterdir()
        threads = [(t / "comm").read_text().strip() for t in tasks]
    except OSError:
        threads = [t.name for t in threading.enumerate()]
    return {
        "sniffio": sniffio.current_async_library(),
        "asyncio_loops": len(loops),
        "threads": sorted(threads),
    }


async def _run_coredis(
    port: int, redis_pid: int, quick: bool, optimized: bool = False
) -> dict[str, Any]:
    import coredis
    from coredis.exceptions import NoScriptError

    coredis.Config.optimized = optimized

    client = coredis.Redis(host="127.0.0.1", port=port, db=0)

    async def call(keys: list[str], args: list[str]) -> Any:
        try:
            return await client.evalsha(SCRIPT_SHA, keys, args)
        except NoScriptError:
            return await client.eval(SCRIPT, keys, args)

    async with client:
        out = await _measure(call, 300 if quick else 3000, 20 if quick else 200)
        out.update(_under_trio())
        out["fault"] = await _fault(call, redis_pid)
        out["version"] = coredis.__version__
    return out


async def _run_glide(port: int, redis_pid: int, quick: bool) -> dict[str, Any]:
    from importlib.metadata import version

    from glide import GlideClient, GlideClientConfiguration, NodeAddress, Script

    config = GlideClientConfiguration([NodeAddress("127.0.0.1", port)], request_timeout=5000)
    client = await GlideClient.create(config)
    script = Script(SCRIPT)  # type: ignore[no-untyped-call]

    async def call(keys: list[str], args: list[str]) -> Any:
        return await client.invoke_script(script, keys=list(keys), args=list(args))

    try:
        out = await _measure(call, 300 if quick else 3000, 20 if quick else 200)
        out.update(_under_trio())
        out["fault"] = await _fault(call, redis_pid)
        out["version"] = version("valkey-glide")
    finally:
        await client.close()
    return out


async def _run_state(port: int, redis_pid: int, quick: bool) -> dict[str, Any]:
    from importlib.metadata import version

    from popproxy.policy.ratelimit import Rate
    from popproxy.state import Limit, parse_state
    from popproxy.state.redis import open_redis_state

    config = parse_state({"backend": "redis", "url": f"redis://127.0.0.1:{port}/0",
                          "key_prefix": "bench:", "timeout": "5s"})
    async with open_redis_state(config) as state:
        limits: dict[str, Limit] = {}

        async def call(keys: list[str], args: list[str]) -> Any:
            # The same work as the raw rows: one GCRA key per task, admitted.
            limit = limits.get(keys[0])
            if limit is None:
                limit = limits[keys[0]] = Limit("bench", keys[0], Rate(1e9, 1.0), 1e9)
            return await state.take([(limit, 1.0)])

        out = await _measure(call, 300 if quick else 3000, 20 if quick else 200)
        out.update(_under_trio())
        out["version"] = "glide " + version("valkey-glide")
        out["calls"] = dict(state.calls)
    return out


def _child(name: str, port: int, redis_pid: int, quick: bool) -> None:
    try:
        if name == "popproxy RedisState":
            result = trio.run(_run_state, port, redis_pid, quick)
        elif name == "valkey-glide":
            result = trio.run(_run_glide, port, redis_pid, quick)
        else:
            result = trio.run(_run_coredis, port, redis_pid, quick, name == "coredis-optimized")
    except ImportError as exc:
        result = {"error": f"not installed: {exc}"}
    except BaseException as exc:  # reported to the parent
        result = {"error": f"{type(exc).__name__}: {exc}"[:300]}
    print(json.dumps(result))


def _report(results: dict[str, dict[str, Any]]) -> None:
    print(f"{'client':<34}{'p50 us':>9}{'p99 us':>9}{'calls/s':>10}{'CPU us/call':>13}"
          f"  under trio")
    for name, r in results.items():
        if "error" in r:
            print(f"{name:<34}  {r['error']}")
            continue
        trio_ok = r["sniffio"] == "trio" and r["asyncio_loops"] == 0
        print(f"{name + ' ' + r['version']:<34}{r['p50_us']:>9.0f}{r['p99_us']:>9.0f}"
              f"{r['calls_per_s']:>10.0f}{r['cpu_us_per_call']:>13.0f}"
              f"  {'yes' if trio_ok else 'NO'} (asyncio loops: {r['asyncio_loops']}, "
              f"threads: {', '.join(r['threads'])})")
    print("\nRedis frozen (SIGSTOP), one call under trio.move_on_after(0.2), then SIGCONT:")
    for name, r in results.items():
        f = r.get("fault")
        if f:
            print(f"{name:<34}  timed out: {f['timed_out']} after {f['out_after_ms']:.0f} ms; "
                  f"next call {f['next_call_ms']:.0f} ms, error {f['next_call_error']}, "
                  f"reply right: {f['next_reply_right']}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run")
    parser.add_argument("--json", help="write the figures to this file")
    parser.add_argument("--child", choices=ROWS, help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--redis-pid", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        _child(args.child, args.port, args.redis_pid, args.quick)
        return 0

    from tests.redis_server import RedisServer, ensure_redis

    reason = ensure_redis()
    if reason is not None:
        print(f"no redis-server: {reason}", file=sys.stderr)
        return 1
    results: dict[str, dict[str, Any]] = {}
    with RedisServer() as server:
        assert server.proc is not None
        for name in ROWS:
            command = [sys.executable, "-m", "benchmarks.state_clients", "--child", name,
                       "--port", str(server.port), "--redis-pid", str(server.proc.pid)]
            if args.quick:
                command.append("--quick")
            proc = subprocess.run(command, capture_output=True, text=True, timeout=300,
                                  check=False)
            lines = proc.stdout.strip().splitlines()
            try:
                results[name] = json.loads(lines[-1])
            except (IndexError, json.JSONDecodeError):
                results[name] = {"error": f"exit {proc.returncode}: {proc.stderr[-300:]}"}
    _report(results)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
