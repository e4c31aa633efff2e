"""``popproxy audit verify|search``: the compliance officer's tools.

``verify FILE...`` walks the hash chain through the files (in chain order,
whatever order they are given in) and names the first record that is
edited, missing or out of place; exit status 1 when the chain is broken,
2 when a file cannot be read.

``search FILE...`` prints the records matching every filter given (user,
event, time range, Message-ID, UIDL, session, client) as a table or as
JSON lines, oldest first.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime
from fnmatch import fnmatchcase
from typing import Any, TextIO

from ._chain import verify_files

__all__ = ["add_parser", "main", "run"]

_CHAIN_FIELDS = ("seq", "prev", "hash")
_BASE_FIELDS = ("ts", "event", "session", "user", "client")
# The order of the other fields in the table's DETAILS column.
_DETAIL_ORDER = {key: i for i, key in enumerate((
    "mechanism", "verb", "args", "outcome", "code", "latency", "command", "msg", "lines",
    "msgs", "uidl", "octets", "sha256", "message_id", "complete", "headers",
    "possibly_partial", "rule", "action", "enforced", "reason", "detail", "duration",
    "bytes_in", "bytes_out", "commands", "upstream", "records", "since",
))}


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``audit verify`` and ``audit search`` to the ``popproxy`` command line."""
    audit = sub.add_parser("audit", help="verify and search audit files",
                           description="Verify and search audit files.")
    cmds = audit.add_subparsers(dest="audit_command", metavar="SUBCOMMAND", required=True)

    verify = cmds.add_parser(
        "verify", help="check the hash chain of audit files",
        description="Check the hash chain through the given audit files (the live file "
        "and its rotated files, in any order) and report the first record that was "
        "edited, removed or moved. Exit status: 0 intact, 1 broken, 2 unreadable.",
    )
    verify.add_argument("files", nargs="+", metavar="FILE", help="audit files (JSON lines)")
    verify.add_argument("--from-start", action="store_true",
                        help="also require the chain to begin with its first record (seq 1)")

    search = cmds.add_parser(
        "search", help="find audit records",
        description="Print the audit records that match all the filters given, oldest "
        "first. Times are RFC 3339 / ISO 8601 (a time without a zone is UTC; a date alone "
        "means midnight UTC).",
    )
    search.add_argument("files", nargs="+", metavar="FILE", help="audit files (JSON lines)")
    search.add_argument("-u", "--user", action="append", metavar="USER",
                        help="user name; shell-style patterns work (archive*); repeatable")
    search.add_argument("-e", "--event", action="append", metavar="EVENT",
                        help="event name, a prefix such as message.delete, or a pattern; "
                        "repeatable")
    search.add_argument("--since", type=_time_arg, metavar="TIME",
                        help="records at or after TIME")
    search.add_argument("--until", type=_time_arg, metavar="TIME", help="records before TIME")
    search.add_argument("-m", "--message-id", metavar="ID",
                        help="Message-ID, with or without <angle brackets>")
    search.add_argument("--uidl", metavar="UIDL", help="the message's unique id (UIDL)")
    search.add_argument("-s", "--session", metavar="ID", help="session id")
    search.add_argument("-c", "--client", metavar="ADDRESS",
                        help="client address, or its start (192.0.2.7)")
    search.add_argument("--json", action="store_true",
                        help="print matching records as JSON lines instead of a table")


def run(args: argparse.Namespace, out: TextIO | None = None, err: TextIO | None = None) -> int:
    """Run ``popproxy audit <subcommand>``; returns the exit status."""
    out = out if out is not None else sys.stdout
    err = err if err is not None else sys.stderr
    if args.audit_command == "verify":
        return _verify(args.files, args.from_start, out, err)
    if args.audit_command == "search":
        return _search(args, out, err)
    raise AssertionError(args.audit_command)  # argparse allows nothing else


def main(
    argv: Sequence[str] | None = None, out: TextIO | None = None, err: TextIO | None = None
) -> int:
    """``python -m popproxy.audit ...``: the same as ``popproxy audit ...``."""
    parser = argparse.ArgumentParser(prog="popproxy")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    add_parser(sub)
    args = parser.parse_args(["audit", *(sys.argv[1:] if argv is None else argv)])
    return run(args, out, err)


# --------------------------------------------------------------------------


def _read(files: Sequence[str], err: TextIO) -> list[tuple[str, bytes]] | None:
    contents: list[tuple[str, bytes]] = []
    for name in files:
        try:
            with open(name, "rb") as f:
                contents.append((name, f.read()))
        except OSError as exc:
            print(f"popproxy audit: {name}: {exc.strerror or exc}", file=err)
            return None
    return contents


def _verify(files: Sequence[str], from_start: bool, out: TextIO, err: TextIO) -> int:
    contents = _read(files, err)
    if contents is None:
        return 2
    result = verify_files(contents, from_start=from_start)
    for note in result.notes or ():
        print(f"note: {note}", file=out)
    for problem in result.problems or ():
        if not problem.fatal:
            print(f"warning: {problem}", file=out)
    broken = result.broken
    if broken is not None:
        print(f"BROKEN: {broken}", file=out)
        if result.records:
            print(f"({result.records} records before it are intact, "
                  f"seq {result.first}..{result.last})", file=out)
        return 1
    if not result.records:
        print("BROKEN: no chained audit records in the files given", file=out)
        return 1
    noun = "file" if result.files == 1 else "files"
    print(f"OK: {result.records} records, seq {result.first}..{result.last}, "
          f"in {result.files} {noun}; the hash chain is intact", file=out)
    return 0


def _time_arg(text: str) -> datetime:
    try:
        t = datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"not a time: {text!r} (use e.g. 2026-11-27 or 2026-11-27T14:00:00Z)"
        ) from None
    return t.replace(tzinfo=UTC) if t.tzinfo is None else t.astimezone(UTC)


def _bare_id(value: str) -> str:
    return value.strip().removeprefix("<").removesuffix(">")


def _records(contents: list[tuple[str, bytes]], err: TextIO) -> Iterator[dict[str, Any]]:
    for name, data in contents:
        for number, line in enumerate(data.splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError:
                record = None
            if not isinstance(record, dict) or not isinstance(record.get("event"), str):
                print(f"popproxy audit: {name}:{number}: not an audit record, skipped", file=err)
                continue
            yield record


def _matches(record: dict[str, Any], args: argparse.Namespace) -> bool:
    if args.user and not any(
        isinstance(record.get("user"), str) and fnmatchcase(record["user"], u) for u in args.user
    ):
        return False
    if args.event:
        event = record["event"]
        if not any(event == e or event.startswith(e + ".") or fnmatchcase(event, e)
                   for e in args.event):
            return False
    if args.since is not None or args.until is not None:
        try:
            ts = datetime.fromisoformat(str(record.get("ts")))
        except ValueError:
            return False
        ts = ts.replace(tzinfo=UTC) if ts.tzinfo is None else ts
        if args.since is not None and ts < args.since:
            return False
        if args.until is not None and ts >= args.until:
            return False
    if args.message_id is not None:
        mid = record.get("message_id")
        if not isinstance(mid, str) or _bare_id(mid) != _bare_id(args.message_id):
            return False
    if args.uidl is not None and record.get("uidl") != args.uidl:
        return False
    if args.session is not None and record.get("session") != args.session:
        return False
    if args.client is not None:
        client = record.get("client")
        if not isinstance(client, str) or not client.startswith(args.client):
            return False
    return True


def _details(record: dict[str, Any]) -> str:
    parts = []
    keys = sorted(record, key=lambda k: (_DETAIL_ORDER.get(k, len(_DETAIL_ORDER)), k))
    for key in keys:
        value = record[key]
        if key in _BASE_FIELDS or key in _CHAIN_FIELDS or value is None:
            continue
        if isinstance(value, str):
            text = value if value and " " not in value else json.dumps(value, ensure_ascii=False)
        else:
            text = json.dumps(value, ensure_ascii=False, separators=(",", ":"))
        parts.append(f"{key}={text}")
    return " ".join(parts)


def _search(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    contents = _read(args.files, err)
    if contents is None:
        return 2
    found = [r for r in _records(contents, err) if _matches(r, args)]
    found.sort(key=lambda r: str(r.get("ts", "")))
    if args.json:
        for record in found:
            print(json.dumps(record, separators=(",", ":"), ensure_ascii=False), file=out)
        return 0
    header = ("TIME", "EVENT", "USER", "CLIENT", "SESSION", "DETAILS")
    rows = [
        (str(r.get("ts", "")), r["event"], str(r.get("user") or "-"),
         str(r.get("client") or "-"), str(r.get("session") or "-"), _details(r))
        for r in found
    ]
    widths = [max([len(header[i]), *(len(row[i]) for row in rows)]) for i in range(5)]
    for row in [header, *rows]:
        cells = [row[i].ljust(widths[i]) for i in range(5)]
        print("  ".join([*cells, row[5]]).rstrip(), file=out)
    print(f"({len(rows)} record{'s' if len(rows) != 1 else ''})", file=err)
    return 0
