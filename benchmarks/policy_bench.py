"""What do policy rules cost?  The proxy with no rules against the proxy with 50.

Run from the repository root::

    python -m benchmarks.policy_bench            # the full run (about 20 seconds)
    python -m benchmarks.policy_bench --quick    # a smoke run
    python -m benchmarks.policy_bench --json policy.json

One private Dovecot (``tests/dovecot.py``, high-performance login mode) and
two proxy processes in front of it (``python -m popproxy run -c FILE``,
configurations checked with ``popproxy check-config`` first): "no rules"
(the built-in protections only) and "50 rules", a realistic mix in
``[[policy.rules]]`` (see ``rule_set``):

* ``allow`` exceptions for other networks (CIDR, IPv4 and IPv6);
* ``deny`` rules on user globs (read-only archives, blocked accounts), on
  commands, on blocklisted networks, on a time window, on plaintext logins;
* ``rate_limit`` rules that DO match the benchmark's users and commands,
  with limits far above what the run sends ("1000000/minute" on NOOP and
  RETR per user, per client IP, globally; an octet budget of 1000 GiB/hour;
  one inside an almost-all-day time window), and some that match others.

No ``allow`` or ``deny`` rule matches the benchmark's users, so every
command is judged against all 50 rules: the worst case for evaluation.
Before measuring, a "probe" user checks that the rule set is live (its NOOP
is denied and its second RSET is rate limited by the 50-rule proxy, not by
the other).

Measured interleaved (no rules, rules; then rules, no rules; ...) so that
machine noise hits both alike:

1. NOOP round trip: on one logged-in session per proxy, a block of NOOPs per
   round; p50 and p99 per round, then the median over the rounds.
2. RETR throughput of a 20 MiB message (a fresh session per measurement;
   only the RETR is timed): MB/s (10^6 octets/s) of the raw reply, median.

Also: each proxy process's CPU time per NOOP and per MB while it was
measured.  The bar: the proxy with 50 rules within 5% of the proxy without
(NOOP p50 and p99 at most 1.05x, RETR throughput at least 0.95x).  Exit
status 1 when a bar is missed or a step failed.

Every loop is bounded in count and in time; everything is on 127.0.0.1 with
ports picked by binding port 0; Dovecot and both proxies are stopped on
exit, Ctrl-C, SIGTERM and errors.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from benchmarks._client import Conn, ProtocolFailure
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

__all__ = ["main", "rule_set"]

MIB = 1 << 20
BAR = 0.05
NOOP_USER, BIG_USER, PROBE_USER = "noop", "big", "probe"
USERS = {NOOP_USER: "noop-Secret1", BIG_USER: "big-Secret2", PROBE_USER: "probe-Secret3"}


@dataclass(frozen=True)
class Settings:
    rounds: int = 15
    noop_block: int = 1_000  # NOOPs per round and proxy
    noop_warmup: int = 300
    size_mib: int = 20
    retrs: int = 1  # per round and proxy
    max_seconds: float = 600.0  # the whole measurement

    @classmethod
    def quick(cls) -> Settings:
        return cls(rounds=3, noop_block=300, noop_warmup=100, size_mib=5, max_seconds=120.0)


@dataclass
class Arm:
    name: str
    proxy: ProxyProcess
    # Single-process mode: the [policy] text this arm runs with, switched in
    # by rewriting the file and sending SIGHUP before each of its blocks.
    policy_text: str | None = None
    noop_p50_us: list[float] = field(default_factory=list)  # per round
    noop_p99_us: list[float] = field(default_factory=list)
    noop_all_us: list[float] = field(default_factory=list)
    retr_mb_s: list[float] = field(default_factory=list)
    retr_octets: int = 0
    # The proxy process's CPU while its NOOPs / RETRs were measured.
    noop_cpu: CpuMeter = field(init=False)
    retr_cpu: CpuMeter = field(init=False)

    def __post_init__(self) -> None:  # after proxy.start(): the pid is known
        self.noop_cpu = CpuMeter(self.proxy.pid)
        self.retr_cpu = CpuMeter(self.proxy.pid)


# --------------------------------------------------------------------------
# The rule set
# --------------------------------------------------------------------------


def _toml_list(values: Sequence[str]) -> str:
    return "[" + ", ".join(json.dumps(v) for v in values) + "]"


def rule_set() -> list[str]:
    """50 ``[[policy.rules]]`` tables: a realistic mix (see the module docstring).

    None of the allow/deny rules matches the users ``noop`` or ``big`` from
    127.0.0.1; the rate limits marked "matches" do, with limits the run
    cannot reach; the last two catch the user ``probe`` only.
    """
    rules: list[str] = []

    def rule(name: str, match: dict[str, str], action: str, **extra: str) -> None:
        body = ", ".join(f"{k} = {v}" for k, v in match.items())
        lines = ["[[policy.rules]]", f'name = "{name}"', f"match = {{ {body} }}",
                 f'action = "{action}"']
        lines += [f"{k} = {v}" for k, v in extra.items()]
        rules.append("\n".join(lines))

    # Exceptions first (an allow stops evaluation): office and VPN networks.
    for i in range(1, 5):
        rule(f"allow-office-{i}", {"networks": _toml_list([f"10.{i}.0.0/16", f"fd00:{i:x}::/32"])},
             "allow")
    for i in range(1, 5):
        rule(f"allow-ops-{i}", {"users": _toml_list([f"ops{i}-*", f"admin{i}@*"]),
                                "networks": _toml_list([f"172.{15 + i}.0.0/16"])}, "allow")
    # Read-only archive mailboxes: users globs and DELE.
    for i in range(1, 13):
        rule(f"archive-{i:02d}-read-only",
             {"users": _toml_list([f"archive{i:02d}*", f"*.archive{i:02d}"]),
              "commands": '["DELE"]'},
             "deny", message='"this mailbox is read-only"')
    # Blocked accounts: users globs only, so judged on every command.
    for i in range(1, 7):
        rule(f"blocked-accounts-{i}",
             {"users": _toml_list([f"blocked{i}-*", f"*@suspended{i}.example", f"tmp{i}?"])},
             "deny", message='"this account is suspended"')
    # Blocklisted networks (documentation ranges), IPv4 and IPv6.
    for i, nets in enumerate((
        ["192.0.2.0/24", "198.51.100.0/24"],
        ["203.0.113.0/24", "2001:db8::/32"],
        ["100.64.0.0/10", "fc00::/7"],
        ["169.254.0.0/16", "fe80::/10", "224.0.0.0/4"],
    ), start=1):
        rule(f"blocklist-{i}", {"networks": _toml_list(nets)}, "deny",
             message='"connections from this network are refused"')
    # Legacy commands, and APOP from outside.
    rule("no-last", {"commands": '["LAST"]'}, "deny", message='"LAST is not offered"')
    rule("no-apop-outside", {"commands": '["APOP"]', "networks": '["128.0.0.0/1"]'}, "deny")
    # Time windows: contractors only in office hours; interns never at night.
    rule("contractors-office-hours",
         {"users": '["contractor-*"]',
          "time": '{ days = ["sat", "sun"], start = "00:00", end = "23:59", timezone = "UTC" }'},
         "deny", message='"not at the weekend"')
    rule("interns-no-night-retr",
         {"users": '["intern-*"]', "commands": '["RETR", "TOP"]',
          "time": '{ start = "22:00", end = "06:00", timezone = "Europe/Berlin" }'},
         "deny", message='"downloads are closed at night"')
    # Plaintext logins from a partner network.
    rule("partner-needs-tls", {"commands": '["USER", "PASS"]', "tls": "false",
                               "networks": '["198.18.0.0/15"]'}, "deny")
    # Rate limits that match the benchmark's users (limits it cannot reach).
    rule("noop-per-user", {"commands": '["NOOP"]'}, "rate_limit",
         limit='"1000000/minute"', per='"user"')
    rule("retr-per-user", {"commands": '["RETR", "TOP"]'}, "rate_limit",
         limit='"1000000/minute"', per='"user"')
    rule("commands-per-user", {"authenticated": "true"}, "rate_limit",
         limit='"1000000/minute"', per='"user"')
    rule("commands-per-ip", {}, "rate_limit", limit='"1000000/minute"', per='"client_ip"')
    rule("commands-global", {}, "rate_limit", limit='"100000000/hour"', per='"global"')
    rule("octets-per-user", {"commands": '["RETR", "TOP"]'}, "rate_limit",
         limit='"1000GiB/hour"', per='"user"')
    rule("octets-per-ip", {"commands": '["RETR"]'}, "rate_limit",
         limit='"1000GiB/hour"', per='"client_ip"')
    rule("daytime-per-user",
         {"commands": '["NOOP", "RETR", "STAT", "LIST", "UIDL"]',
          "time": '{ start = "06:00", end = "05:59", timezone = "UTC" }'},
         "rate_limit", limit='"1000000/minute"', per='"user"')
    # Rate limits for others.
    rule("mobile-retr", {"users": '["mobile-*"]', "commands": '["RETR"]'}, "rate_limit",
         limit='"60/minute"', per='"user"')
    rule("guest-octets", {"users": '["guest*"]'}, "rate_limit", limit='"100MiB/hour"',
         per='"user"')
    rule("lab-net-commands", {"networks": '["10.200.0.0/16", "fd00:200::/32"]'}, "rate_limit",
         limit='"600/minute"', per='"client_ip"')
    rule("bulk-top", {"users": '["bulk*"]', "commands": '["TOP"]'}, "rate_limit",
         limit='"10/second"', per='"user"', on_limit='"delay"', max_delay='"5s"')
    rule("unauth-per-ip", {"authenticated": "false", "networks": '["192.168.0.0/16"]'},
         "rate_limit", limit='"30/minute"', per='"client_ip"', burst="10")
    # The probe: proves the rule set is live (last, so all others are judged first).
    rule("probe-rset-once", {"users": f'["{PROBE_USER}"]', "commands": '["RSET"]'},
         "rate_limit", limit='"1/hour"', per='"user"')
    rule("probe-no-noop", {"users": f'["{PROBE_USER}"]', "commands": '["NOOP"]'}, "deny",
         message='"probe: denied by rule 50"')
    return rules


def rules_config() -> str:
    rules = rule_set()
    if len(rules) != 50:
        raise AssertionError(f"the rule set has {len(rules)} rules, not 50")
    return '[policy]\nmode = "enforce"\n\n' + "\n\n".join(rules) + "\n"


# --------------------------------------------------------------------------
# Measurements
# --------------------------------------------------------------------------


def probe(proxy: ProxyProcess) -> tuple[bytes, bytes]:
    """(NOOP reply, second RSET reply) of the user ``probe`` through ``proxy``."""
    conn = Conn(proxy.host, proxy.port, timeout=30.0)
    try:
        conn.login(PROBE_USER, USERS[PROBE_USER])
        conn.send(b"NOOP\r\n")
        noop = conn.line()
        conn.cmd("RSET")
        conn.send(b"RSET\r\n")
        rset = conn.line()
        conn.cmd("QUIT")
    finally:
        conn.close()
    return noop.strip(), rset.strip()


def noop_block(conn: Conn, count: int, meter: CpuMeter) -> list[float]:
    """``count`` NOOP round trips on a logged-in ``conn``, in µs."""
    out: list[float] = []
    sock = conn.sock
    clock = time.perf_counter_ns
    with meter.measure():
        for _ in range(count):
            t0 = clock()
            sock.sendall(b"NOOP\r\n")
            conn.ok_line()
            out.append((clock() - t0) / 1000.0)
    return out


def retr_once(proxy: ProxyProcess, scratch: bytearray, meter: CpuMeter | None) -> tuple[float, int]:
    """One session through ``proxy`` that RETRs message 1 of ``big``: (MB/s, octets)."""
    conn = Conn(proxy.host, proxy.port, timeout=60.0)
    try:
        conn.login(BIG_USER, USERS[BIG_USER])
        with meter.measure() if meter is not None else contextlib.nullcontext():
            octets, seconds = conn.retr_raw(1, scratch)
        conn.cmd("QUIT")
    finally:
        conn.close()
    return octets / seconds / 1e6, octets


def switch_to(arm: Arm) -> None:
    """In single-process mode, make ``arm``'s rule set the live one (SIGHUP)."""
    proxy = arm.proxy
    if arm.policy_text is None or proxy.extra_config == arm.policy_text:
        return
    proxy.extra_config = arm.policy_text
    proxy.config_path.write_text(proxy.config_text())
    os.kill(proxy.pid, signal.SIGHUP)
    want_rules = bool(arm.policy_text)
    deadline = time.monotonic() + 10.0
    while True:  # an external process's reload: poll its effect, bounded
        noop, rset = probe(proxy)
        live = noop.startswith(b"-ERR [SYS/PERM] probe") and b"rate limit" in rset
        if live == want_rules:
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"the reload to '{arm.name}' did not take effect")
        time.sleep(0.02)


def measure(s: Settings, arms: tuple[Arm, Arm], notes: list[str]) -> None:
    scratch = bytearray(1 << 20)
    want = s.size_mib * MIB
    conns: dict[str, Conn] = {}
    try:
        for arm in arms:
            conn = conns[arm.name] = Conn(arm.proxy.host, arm.proxy.port, timeout=30.0)
            conn.login(NOOP_USER, USERS[NOOP_USER])
            noop_block(conn, s.noop_warmup, CpuMeter(arm.proxy.pid))  # warm-up
            retr_once(arm.proxy, scratch, None)  # warm-up: page cache, Dovecot's caches
        deadline = time.monotonic() + s.max_seconds
        for r in range(s.rounds):
            order = arms if r % 2 == 0 else arms[::-1]
            for arm in order:
                switch_to(arm)
                lat = noop_block(conns[arm.name], s.noop_block, arm.noop_cpu)
                arm.noop_p50_us.append(percentile(lat, 50))
                arm.noop_p99_us.append(percentile(lat, 99))
                arm.noop_all_us += lat
            for arm in order[::-1]:
                switch_to(arm)
                for _ in range(s.retrs):
                    mbps, octets = retr_once(arm.proxy, scratch, arm.retr_cpu)
                    if octets < want:
                        raise ProtocolFailure(f"RETR gave only {octets} octets")
                    arm.retr_mb_s.append(mbps)
                    arm.retr_octets += octets
            a, b = arms
            log(f"round {r + 1}/{s.rounds}: NOOP p50 {a.noop_p50_us[-1]:.1f} / "
                f"{b.noop_p50_us[-1]:.1f} µs, p99 {a.noop_p99_us[-1]:.1f} / "
                f"{b.noop_p99_us[-1]:.1f} µs; RETR {a.retr_mb_s[-1]:,.0f} / "
                f"{b.retr_mb_s[-1]:,.0f} MB/s ({a.name} / {b.name})")
            for arm in arms:
                arm.proxy.check_alive()
            if time.monotonic() > deadline:
                notes.append(f"stopped after {r + 1} of {s.rounds} rounds at the time bound")
                break
        for conn in conns.values():
            conn.cmd("QUIT")
    finally:
        for conn in conns.values():
            conn.close()


# --------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------


def report(s: Settings, base: Arm, rules: Arm) -> tuple[list[list[str]], dict[str, Any], bool]:
    rows: list[list[str]] = []
    figures: dict[str, Any] = {}
    ok_all = True

    def row(figure: str, a: float, b: float, digits: int, lower_is_better: bool,
            bar: bool = True, paired: float | None = None) -> None:
        """``paired``: the median of per-round ratios; when given, the verdict
        uses it, since it cancels the drift between rounds that the two
        processes' medians do not."""
        nonlocal ok_all
        ratio = paired if paired is not None else (b / a if a else float("nan"))
        if bar:
            ok = ratio <= 1 + BAR if lower_is_better else ratio >= 1 - BAR
            ok_all = ok_all and ok
            limit = f"≤ {1 + BAR:.2f}x" if lower_is_better else f"≥ {1 - BAR:.2f}x"
            verdict = "PASS" if ok else "MISS"
        else:
            limit, verdict = "—", "—"
        rows.append([figure, fmt(a, digits), fmt(b, digits), f"{ratio:.3f}x", limit, verdict])
        figures[figure] = {"no_rules": a, "rules": b, "ratio": ratio}

    def paired(a: Sequence[float], b: Sequence[float]) -> float:
        return median([y / x for x, y in zip(a, b, strict=False) if x])

    n = len(base.noop_p50_us)
    row(f"NOOP round trip p50 (µs; median of {n} rounds × {s.noop_block:,}; ratio paired)",
        median(base.noop_p50_us), median(rules.noop_p50_us), 1, True,
        paired=paired(base.noop_p50_us, rules.noop_p50_us))
    row("NOOP round trip p99 (µs; median of the rounds' p99)",
        median(base.noop_p99_us), median(rules.noop_p99_us), 1, True)
    row(f"NOOP p50 / p99 over all {len(base.noop_all_us):,} (µs)",
        percentile(base.noop_all_us, 50), percentile(rules.noop_all_us, 50), 1, True, False)
    rows[-1][1] += f" / {fmt(percentile(base.noop_all_us, 99), 1)}"
    rows[-1][2] += f" / {fmt(percentile(rules.noop_all_us, 99), 1)}"
    row(f"RETR {s.size_mib} MiB throughput (MB/s; median of {len(base.retr_mb_s)}; "
        "ratio paired)",
        median(base.retr_mb_s), median(rules.retr_mb_s), 0, False,
        paired=paired(base.retr_mb_s, rules.retr_mb_s))
    row("Proxy CPU per NOOP (µs, user + sys)",
        base.noop_cpu.cpu / max(1, len(base.noop_all_us)) * 1e6,
        rules.noop_cpu.cpu / max(1, len(rules.noop_all_us)) * 1e6, 1, True, False)
    row("Proxy CPU per MB of RETR (ms, user + sys)",
        base.retr_cpu.cpu / max(1, base.retr_octets / 1e6) * 1e3,
        rules.retr_cpu.cpu / max(1, rules.retr_octets / 1e6) * 1e3, 3, True, False)
    return rows, figures, ok_all


def render(rows: Sequence[Sequence[str]]) -> str:
    head = ("Figure", "No rules", "50 rules", "Rules / no rules", "Bar", "Result")
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] * len(head)) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


# --------------------------------------------------------------------------
# Orchestration
# --------------------------------------------------------------------------


def _start_pair(
    stack: contextlib.ExitStack, workdir: Path, upstream_port: int, launcher: Sequence[str],
) -> tuple[Arm, Arm]:
    arms: list[Arm] = []
    for name, extra in (("no rules", ""), ("50 rules", rules_config())):
        tag = "cli" if tuple(launcher) == CLI_LAUNCHER else "app"
        d = workdir / f"{name.replace(' ', '-')}-{tag}"
        d.mkdir()
        proxy = ProxyProcess(upstream_port, d, max_sessions=100, extra_config=extra,
                             launcher=launcher)
        problem = proxy.check_config()
        if problem:
            raise RuntimeError(f"popproxy check-config refused the {name} config: {problem}")
        stack.callback(proxy.stop)
        proxy.start()
        arms.append(Arm(name, proxy))
        log(f"proxy '{name}' pid {proxy.pid} on 127.0.0.1:{proxy.port} "
            f"(config {proxy.config_path}, check-config OK)")
    return arms[0], arms[1]


def _probe_pair(base: Arm, rules: Arm) -> str:
    """'' when the rule set is live in ``rules`` and absent from ``base``, else what is seen."""
    seen = []
    for arm, denied in ((base, False), (rules, True)):
        noop, rset = probe(arm.proxy)
        live = noop.startswith(b"-ERR [SYS/PERM] probe") and b"rate limit" in rset
        plain = noop.startswith(b"+OK") and rset.startswith(b"+OK")
        if (denied and not live) or (not denied and not plain):
            seen.append(f"'{arm.name}': NOOP {noop!r}, second RSET {rset!r}")
    return "; ".join(seen)


def start_arms(
    stack: contextlib.ExitStack, workdir: Path, upstream_port: int, launcher: str,
    notes: list[str],
) -> tuple[Arm, Arm]:
    """Both proxies, started and probed.  ``launcher``: "cli", "app" or "auto"
    (``popproxy run``; if it does not enforce the rules, ``app.run``)."""
    argv = APP_RUN_LAUNCHER if launcher == "app" else CLI_LAUNCHER
    base, rules = _start_pair(stack, workdir, upstream_port, argv)
    problem = _probe_pair(base, rules)
    if problem and launcher == "auto":
        notes.append(
            "`popproxy run -c FILE` does not enforce [[policy.rules]] (probe: "
            f"{problem}): popproxy/cli.py runs Proxy(config) without app.build, so no "
            "policy engine; measured with both proxies started through popproxy.app.run "
            "(app.build, what `run` should do) instead")
        log("popproxy run ignores the rules; restarting both proxies through app.run")
        base.proxy.stop()
        rules.proxy.stop()
        argv = APP_RUN_LAUNCHER
        base, rules = _start_pair(stack, workdir, upstream_port, argv)
        problem = _probe_pair(base, rules)
    if problem:
        hint = (" (popproxy run does not build the policy engine; --launcher app does)"
                if argv == CLI_LAUNCHER else "")
        raise RuntimeError(f"the rule set is not live as expected: {problem}{hint}")
    how = "popproxy run -c FILE" if argv == CLI_LAUNCHER else "popproxy.app.run"
    notes.append(f"proxies started through {how}; probe: the 50-rule proxy denied the "
                 "probe's NOOP (rule 50) and rate limited its second RSET (rule 49); the "
                 "other proxy let both through")
    return base, rules


def start_single(
    stack: contextlib.ExitStack, workdir: Path, upstream_port: int, notes: list[str],
) -> tuple[Arm, Arm]:
    """One proxy process; the two arms differ only by the rule set, switched
    with SIGHUP before each block, so process placement and warm caches are
    the same for both."""
    d = workdir / "single"
    d.mkdir()
    proxy = ProxyProcess(upstream_port, d, max_sessions=100, extra_config=rules_config(),
                         launcher=CLI_LAUNCHER)
    problem = proxy.check_config()
    if problem:
        raise RuntimeError(f"popproxy check-config refused the 50-rule config: {problem}")
    stack.callback(proxy.stop)
    proxy.start()
    log(f"proxy pid {proxy.pid} on 127.0.0.1:{proxy.port}; rule sets switched by SIGHUP")
    notes.append("one proxy process (popproxy run); the rule set switched by SIGHUP "
                 "before each block and confirmed with the probe user")
    base = Arm("no rules", proxy, policy_text="")
    rules = Arm("50 rules", proxy, policy_text=rules_config())
    return base, rules


def run(s: Settings, launcher: str = "auto", single: bool = True) -> tuple[Arm, Arm, list[str]]:
    reason = ensure_dovecot()
    if reason is not None:
        raise RuntimeError(f"benchmark needs Dovecot: {reason}")
    notes: list[str] = []
    with contextlib.ExitStack() as stack:
        workdir = Path(stack.enter_context(
            tempfile.TemporaryDirectory(prefix="popproxy-policy-bench-")))
        dovecot = Dovecot(USERS, extra_config=dovecot_extra_config(64))
        stack.callback(dovecot.stop)
        dovecot.start()
        dovecot.deliver(BIG_USER, make_message(s.size_mib * MIB, "policy-big"))
        dovecot.deliver(NOOP_USER, SAMPLE_MESSAGES[0])
        dovecot.deliver(PROBE_USER, SAMPLE_MESSAGES[0])
        log(f"Dovecot on 127.0.0.1:{dovecot.port} (started in {dovecot.startup_seconds:.2f}s)")
        if single:
            base, rules = start_single(stack, workdir, dovecot.port, notes)
        else:
            base, rules = start_arms(stack, workdir, dovecot.port, launcher, notes)
        measure(s, (base, rules), notes)
        for arm in (base, rules):
            arm.proxy.check_alive()
            lines = arm.proxy.log_lines()
            if lines:
                notes.append(f"proxy '{arm.name}' logged {len(lines)} lines, the last: "
                             f"{lines[-1][:300]}")
    return base, rules, notes


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.policy_bench",
                                 description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("--quick", action="store_true", help="smoke run: fewer rounds, 5 MiB")
    ap.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    ap.add_argument("--launcher", choices=("auto", "cli", "app"), default="auto",
                    help="how the proxies start: `popproxy run -c FILE` (cli), "
                    "popproxy.app.run (app), or cli unless it ignores the rules (auto)")
    ap.add_argument("--two-processes", action="store_true",
                    help="one proxy process per arm (default: one process, the rule set "
                    "switched by SIGHUP)")
    ap.add_argument("--print-rules", action="store_true",
                    help="print the 50-rule [policy] section and exit")
    args = ap.parse_args(argv)
    if args.print_rules:
        print(rules_config(), end="")
        return 0
    s = Settings.quick() if args.quick else Settings()
    started = time.monotonic()
    try:
        with _sigterm_as_interrupt():
            base, rules, notes = run(s, args.launcher, single=not args.two_processes)
    except KeyboardInterrupt:
        print("interrupted; Dovecot and the proxies were stopped", file=sys.stderr)
        return 130
    except (RuntimeError, OSError) as exc:
        print(f"policy benchmark failed: {exc}", file=sys.stderr)
        return 2
    rows, figures, ok = report(s, base, rules)
    mode = "quick" if args.quick else "full"
    print(f"\n## popproxy policy cost ({mode}; no rules vs 50 rules; {len(base.noop_p50_us)} "
          f"interleaved rounds; run took {time.monotonic() - started:.0f}s)\n")
    print(render(rows))
    for note in notes:
        print(f"\nNote: {note}")
    if args.json:
        doc = {
            "mode": mode, "settings": asdict(s), "figures": figures, "pass": ok, "notes": notes,
            "rounds": {arm.name: {"noop_p50_us": arm.noop_p50_us, "noop_p99_us": arm.noop_p99_us,
                                  "retr_mb_s": arm.retr_mb_s} for arm in (base, rules)},
        }
        Path(args.json).write_text(json.dumps(doc, indent=2) + "\n")
        print(f"\nwrote {args.json}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
