"""``popproxy audit verify|search|keygen``: the compliance officer's tools.

``verify FILE...`` walks the hash chain through the files (in chain order,
whatever order they are given in) and names the first record that is
edited, missing or out of place; exit status 1 when the chain is broken,
2 when a file cannot be read.  With ``--key`` it also checks the signed
checkpoints and says up to which ``seq`` the trail is signed; with
``--checkpoints`` it compares the trail with a shipped copy of them.

``keygen --out FILE`` makes the Ed25519 key that signs the checkpoints.

``search FILE...`` prints the records matching every filter given (user,
event, time range, Message-ID, UIDL, session, client) as a table or as
JSON lines, oldest first.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any, TextIO

from ._note import NoteError, Signer, Verifier, valid_name
from ._verify import ChainReport, TrailReport, verify_trail
from .config import default_origin

__all__ = ["add_parser", "main", "run"]

_CHAIN_FIELDS = ("seq", "prev", "hash")
_BASE_FIELDS = ("ts", "event", "session", "user", "client")
# The order of the other fields in the table's DETAILS column.
_DETAIL_ORDER = {key: i for i, key in enumerate((
    "mechanism", "verb", "args", "outcome", "code", "latency", "command", "msg", "lines",
    "msgs", "uidl", "octets", "sha256", "message_id", "complete", "announced", "headers",
    "possibly_partial", "rule", "action", "enforced", "reason", "detail", "duration",
    "bytes_in", "bytes_out", "commands", "upstream", "records", "since",
    "unclean", "resumed", "sessions", "look_back", "last_seen", "recovered",
))}


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``audit verify`` and ``audit search`` to the ``popproxy`` command line."""
    audit = sub.add_parser("audit", help="verify and search audit files, make a signing key",
                           description="Verify and search audit files; make the key that "
                           "signs audit checkpoints.")
    cmds = audit.add_subparsers(dest="audit_command", metavar="SUBCOMMAND", required=True)

    verify = cmds.add_parser(
        "verify", help="check the hash chain and signed checkpoints of audit files",
        description="Check the hash chain through the given audit files (the live file "
        "and its rotated files, in any order) and report the first record that was "
        "edited, removed or moved. With --key, also check every signed checkpoint and "
        "say up to which record the trail is signed. Exit status: 0 intact, 1 broken, "
        "2 unreadable.",
    )
    verify.add_argument("files", nargs="+", metavar="FILE", help="audit files (JSON lines)")
    verify.add_argument("--from-start", action="store_true",
                        help="also require the chain to begin with its first record (seq 1)")
    verify.add_argument("-k", "--key", action="append", metavar="KEY",
                        help="the verifier key that signs the checkpoints, as `audit keygen` "
                        "prints it, or a file holding it (one key a line); repeatable")
    verify.add_argument("--checkpoints", action="append", metavar="FILE",
                        help="a copy of the checkpoints kept elsewhere (checkpoint_path, "
                        "shipped off the host): each must be in the trail; one past its end "
                        "means the trail was cut; repeatable")

    keygen = cmds.add_parser(
        "keygen", help="make an Ed25519 key to sign audit checkpoints",
        description="Write a new Ed25519 private key to FILE (mode 0600, not overwritten if "
        "it exists) for [audit] sign_key, write its verifier key to FILE.pub and print it. "
        "Give the verifier key to whoever checks the trail (audit verify --key).",
    )
    keygen.add_argument("--out", required=True, metavar="FILE", help="the private key file")
    keygen.add_argument("--name", metavar="NAME",
                        help="the key's name in signatures (default: <hostname>/popproxy)")

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
        return _verify_signed(args, out, err)
    if args.audit_command == "keygen":
        return _keygen(args.out, args.name, out, err)
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


def _verify_signed(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    verifiers: list[Verifier] | None = None
    if args.key:
        verifiers = _keys(args.key, err)
        if verifiers is None:
            return 2
    contents = _read(args.files, err)
    shipped = _read(args.checkpoints, err) if args.checkpoints else []
    if contents is None or shipped is None:
        return 2
    report = verify_trail(contents, verifiers=verifiers,
                          shipped=shipped if args.checkpoints else None,
                          from_start=args.from_start)
    return _print_report(report, out)


def _keys(values: Sequence[str], err: TextIO) -> list[Verifier] | None:
    """Verifier keys from --key values: a key, or a file of them."""
    keys: list[Verifier] = []
    for value in values:
        lines = [value]
        if os.path.exists(value):
            try:
                with open(value, encoding="utf-8") as f:
                    lines = [line for line in f.read().splitlines() if line.strip()]
            except (OSError, UnicodeDecodeError) as exc:
                print(f"popproxy audit: --key {value}: {exc}", file=err)
                return None
        for line in lines:
            if line.startswith("PRIVATE+KEY+"):
                print(f"popproxy audit: --key {value}: that is the private key; give the "
                      "verifier key (FILE.pub of `audit keygen`)", file=err)
                return None
            try:
                keys.append(Verifier.parse(line))
            except NoteError as exc:
                print(f"popproxy audit: --key {value}: {exc}", file=err)
                return None
    if not keys:
        print("popproxy audit: --key: no verifier key given", file=err)
        return None
    return keys


def _print_report(report: TrailReport, out: TextIO) -> int:
    several = len(report.chains) > 1
    ok = report.ok
    # A trail without checkpoints, checked without --key: the chain alone.
    signing = (report.signatures_checked or bool(report.shipped_files)
               or any(c.origins for c in report.chains))
    for chain in report.chains:
        if several:
            origins = ", ".join(chain.origins) or "no checkpoint"
            noun = "file" if len(chain.files) == 1 else "files"
            print(f"trail {origins} ({len(chain.files)} {noun}):", file=out)
        _print_chain(chain, report, out, signing)
    for problem in report.problems:
        print(f"BROKEN: {problem}", file=out)
    if report.shipped_files:
        matched = sum(c.shipped for c in report.chains)
        before = sum(c.shipped_before for c in report.chains)
        extra = f"; {before} for records before these files, not compared" if before else ""
        print(f"shipped: {matched} of {report.shipped_total} checkpoints in the copy are in "
              f"the trail, byte for byte{extra}", file=out)
    if signing and not report.signatures_checked:
        print("signatures NOT checked (no --key): a trail rewritten with a recomputed chain "
              "and checkpoints would pass", file=out)
    return 0 if ok else 1


def _print_chain(chain: ChainReport, report: TrailReport, out: TextIO, signing: bool) -> None:
    result = chain.result
    for note in result.notes or ():
        print(f"note: {note}", file=out)
    for problem in result.problems or ():
        if not problem.fatal:
            print(f"warning: {problem}", file=out)
    signed = (f"signed up to seq {chain.signed_seq} (checkpoint at {chain.checkpoint_where})"
              if chain.signed_seq is not None else "no checkpoint before it")
    broken = result.broken
    if broken is not None:
        print(f"BROKEN: {broken}", file=out)
        if result.records:
            after = f"; {signed}" if signing else ""
            print(f"({result.records} records before it are intact, seq {result.first}.."
                  f"{result.last}{after})", file=out)
        return
    if not result.records:
        print("BROKEN: no chained audit records in the files given", file=out)
        return
    noun = "file" if result.files == 1 else "files"
    print(f"OK: {result.records} records, seq {result.first}..{result.last}, "
          f"in {result.files} {noun}; the hash chain is intact", file=out)
    if chain.failure is not None:
        print(f"BROKEN: {chain.failure}", file=out)
    if not signing:
        return
    tail = f"{chain.tail} record{'s' if chain.tail != 1 else ''}"
    if not chain.checkpoints:
        if chain.failure is None:
            print(f"checkpoints: none; {tail}, not signed", file=out)
        return
    n = chain.checkpoints
    where = f"seq {chain.signed_seq} (checkpoint at {chain.checkpoint_where})"
    if report.signatures_checked:
        keys = ", ".join(sorted(chain.keys))
        print(f"signed: {n} checkpoint{'s' if n != 1 else ''} by {keys} verify; the trail "
              f"is signed up to {where}; {tail} after it, not signed yet", file=out)
    else:
        print(f"checkpoints: {n}, each matching the chain before it; the last covers up to "
              f"{where}; {tail} after it", file=out)


def _keygen(out_path: str, name: str | None, out: TextIO, err: TextIO) -> int:
    name = name if name is not None else default_origin()
    if not valid_name(name):
        print(f"popproxy audit keygen: --name {name!r}: a key name has no spaces and no '+'",
              file=err)
        return 2
    signer = Signer.generate(name)
    path = Path(out_path)
    pub = path.with_name(path.name + ".pub")
    try:
        # Created private (0600) in one step, never there with wider rights;
        # O_EXCL: an existing key is never overwritten.
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        print(f"popproxy audit keygen: {path}: {exc.strerror or exc}"
              + (" (not overwriting a key)" if isinstance(exc, FileExistsError) else ""),
              file=err)
        return 1
    try:
        os.fchmod(fd, 0o600)  # whatever the umask did
        data = (signer.private_text() + "\n").encode("ascii")
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    except OSError as exc:
        os.close(fd)
        path.unlink(missing_ok=True)
        print(f"popproxy audit keygen: {path}: {exc.strerror or exc}", file=err)
        return 1
    os.close(fd)
    verifier = str(signer.verifier)
    try:
        pub.write_text(verifier + "\n", encoding="ascii")
    except OSError as exc:
        print(f"popproxy audit keygen: {pub}: {exc.strerror or exc} (the key in {path} is "
              "made; its verifier key is printed below)", file=err)
    print(verifier, file=out)
    print(f"private key: {path} (mode 0600; set [audit] sign_key to it); verifier key: {pub}",
          file=err)
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
