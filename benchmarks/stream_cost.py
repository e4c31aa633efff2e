"""Where does the proxy's CPU go while it streams a message?  Per GB.

Run from the repository root::

    python -m benchmarks.stream_cost            # about half a minute
    python -m benchmarks.stream_cost --quick

``benchmarks.run`` measures the proxy's CPU per GB of a 100 MiB RETR in
the running process (issue 16's table: 2.1 s per GB, against 0.67 s for
the bare trio relay).  This splits the Python side of that figure, in
this process and without sockets, by running the same bytes through the
layers of the streaming path one at a time, each on its own, in
interleaved rounds (median of the rounds):

- ``copy``: ``bytes`` concatenation of each chunk (the floor of touching
  the octets once in Python);
- ``sha256``: ``hashlib.sha256`` over the unstuffed octets: the audit's
  ``message.retrieve`` digest, which the contract requires;
- ``framing``: ``BodyReader.feed`` without a sink: finding the end of
  the body and the stuffed dots (``CRLF .``);
- ``framing+facts``: the same with ``MessageFacts`` as the sink (the
  digest, the octet count, the header window): the body reader as the
  session runs it;
- ``session``: ``Session.receive_upstream`` for the whole RETR reply
  (status line, body, the ``MessageComplete`` event): everything the
  sans-IO core does per chunk.

What is left of the in-process figure above ``session`` is the relay's
and trio's share (receive, send, scheduling) and the kernel's, which the
relay floor of ``benchmarks.floor`` measures.  The chunks are the size
the relay receives with (``RECEIVE_SIZE``) and, to show how the cost
scales with the reads, 16 KiB (what a busy socket often hands over).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

from benchmarks.run import make_message
from popproxy.pop3 import BodyReader, MessageFacts, stuff
from popproxy.relay import RECEIVE_SIZE
from popproxy.session import Session

GREETING = b"+OK ready\r\n"
Layer = Callable[[list[bytes]], None]


def _chunks(wire: bytes, size: int) -> list[bytes]:
    return [wire[i : i + size] for i in range(0, len(wire), size)]


def copy_layer(chunks: list[bytes]) -> None:
    tail = b"\r\n"
    for c in chunks:
        buf = tail + c
        tail = buf[-4:]


def sha_layer(chunks: list[bytes]) -> None:
    h = hashlib.sha256()
    for c in chunks:
        h.update(c)


def framing_layer(chunks: list[bytes]) -> None:
    reader = BodyReader()
    for c in chunks[1:]:
        if reader.feed(c) >= 0:
            return


def facts_layer(chunks: list[bytes]) -> None:
    reader, facts = BodyReader(), MessageFacts()
    for c in chunks[1:]:
        if reader.feed(c, facts.add) >= 0:
            return


def session_layer(chunks: list[bytes]) -> None:
    s = Session()
    s.receive_upstream(GREETING, 0)
    s.receive_client(b"USER bob\r\nPASS pw\r\n", 0)
    s.receive_upstream(b"+OK\r\n+OK\r\n", 0)
    s.receive_client(b"RETR 1\r\n", 0)
    sent = 0
    for c in chunks:
        out = s.receive_upstream(c, 1)
        sent += len(out.to_client)
    assert sent == sum(map(len, chunks)), "the session did not pass the reply through"


LAYERS: dict[str, Layer] = {
    "copy": copy_layer,
    "sha256": sha_layer,
    "framing": framing_layer,
    "framing+facts": facts_layer,
    "session": session_layer,
}


def measure(size: int, chunk_sizes: Sequence[int], rounds: int) -> dict[str, Any]:
    body = make_message(size, "stream").replace(b"\n", b"\r\n")
    wire = b"+OK message follows\r\n" + stuff(body)
    gb = len(wire) / 1e9
    results: dict[str, Any] = {"octets": len(wire), "rounds": rounds, "chunks": {}}
    for chunk in chunk_sizes:
        # The status line in a chunk of its own, as the framing layers skip it.
        status = wire.index(b"\r\n") + 2
        chunks = [wire[:status], *_chunks(wire[status:], chunk)]
        samples: dict[str, list[float]] = {name: [] for name in LAYERS}
        for r in range(rounds):
            order = list(LAYERS.items())
            if r % 2:
                order.reverse()
            for name, layer in order:
                t = time.process_time()
                layer(chunks)
                samples[name].append((time.process_time() - t) / gb)
        results["chunks"][chunk] = {k: statistics.median(v) for k, v in samples.items()}
    return results


def render(results: dict[str, Any]) -> str:
    sizes = list(results["chunks"])
    head = "| layer (CPU s per GB) | " + " | ".join(f"{c // 1024} KiB reads" for c in sizes) + " |"
    rows = [head, "| --- |" + " --- |" * len(sizes)]
    for name in LAYERS:
        rows.append(f"| {name} | " + " | ".join(
            f"{results['chunks'][c][name]:.2f}" for c in sizes) + " |")
    return "\n".join(rows)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0] if __doc__ else None)
    ap.add_argument("--quick", action="store_true", help="a 20 MiB message, three rounds")
    ap.add_argument("--json", metavar="FILE", help="also write the results here")
    args = ap.parse_args(argv)
    size, rounds = (20, 3) if args.quick else (100, 7)
    results = measure(size * 1024 * 1024, (RECEIVE_SIZE, 16384), rounds)
    print(f"RETR of {results['octets'] / 1e6:.0f} MB on the wire, "
          f"median of {rounds} interleaved rounds, this process's CPU time")
    print(render(results))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
