"""Tests for the demo POP3 server: the sans-IO session first, then real sockets."""

from __future__ import annotations

import base64
import email
import email.policy
import hashlib
import poplib

import pytest
import trio
import trio.testing
from hypothesis import given
from hypothesis import strategies as st

from popproxy.demo import (
    CAPABILITIES,
    DEMO_USERS,
    LINE_LIMIT,
    SASL_LINE_LIMIT,
    DemoSession,
    DemoState,
    Mailbox,
    MailStore,
    Message,
    normalize_crlf,
    serve_demo,
)
from popproxy.demo.server import _LineBuffer
from popproxy.pop3 import stuff

TIMESTAMP = "<4242.7@popproxy-demo>"


# -- helpers -----------------------------------------------------------------


def unstuff_multiline(reply: bytes) -> tuple[bytes, bytes]:
    """Split a multi-line reply into its status line and its unstuffed body."""
    status, sep, rest = reply.partition(b"\r\n")
    assert sep, "no status line"
    assert status.startswith(b"+OK"), status
    assert rest.endswith(b".\r\n"), "no terminator"
    rest = rest[: -len(b".\r\n")]
    assert rest == b"" or rest.endswith(b"\r\n"), "terminator not at a line start"
    lines = rest.split(b"\r\n")[:-1]
    assert b"." not in lines, "terminator inside the body"
    body = b"".join((line[1:] if line.startswith(b".") else line) + b"\r\n" for line in lines)
    return status, body


def run(session: DemoSession, line: bytes) -> bytes:
    """Feed one line and return the reply, asserting the connection stays open."""
    reply, close = session.handle_line(line)
    assert not close, reply
    return reply


def logged_in(store: MailStore, user: str = "alice") -> DemoSession:
    session = DemoSession(store, timestamp=TIMESTAMP)
    assert run(session, f"USER {user}\r\n".encode()).startswith(b"+OK")
    assert run(session, f"PASS {DEMO_USERS[user]}\r\n".encode()).startswith(b"+OK")
    assert session.state is DemoState.TRANSACTION
    return session


def plain(authzid: str, authcid: str, password: str) -> str:
    return base64.b64encode(f"{authzid}\0{authcid}\0{password}".encode()).decode()


@pytest.fixture
def store() -> MailStore:
    return MailStore.load_samples()


# -- data model ----------------------------------------------------------------


class TestSampleStore:
    def test_users_and_message_counts(self, store: MailStore) -> None:
        """The sample store has alice (4), bob (2) and archive (3), with DEMO_USERS passwords."""
        assert {u: len(store[u].messages) for u in store.users} == {
            "alice": 4,
            "bob": 2,
            "archive": 3,
        }
        assert all(store.check_password(u, p) for u, p in DEMO_USERS.items())

    def test_messages_are_crlf_rfc5322(self, store: MailStore) -> None:
        """Every sample is CRLF text with the usual headers and a unique Message-ID."""
        ids = set()
        for user in store.users:
            for message in store[user].messages:
                assert b"\n" not in message.data.replace(b"\r\n", b"")
                parsed = email.message_from_bytes(message.data, policy=email.policy.default)
                for header in ("From", "To", "Subject", "Date", "Message-ID"):
                    assert parsed[header], (message.uid, header)
                ids.add(str(parsed["Message-ID"]))
        assert len(ids) == 9

    def test_special_samples(self, store: MailStore) -> None:
        """alice has a multipart/alternative, a dotted and a ~40 KB message."""
        datas = [m.data for m in store["alice"].messages]
        assert any(b"multipart/alternative" in d for d in datas)
        dotted = [d for d in datas if b"\r\n...and then" in d]
        assert dotted
        assert b"\r\n.\r\n" in dotted[0]
        assert any(36_000 <= len(d) <= 44_000 for d in datas)

    def test_each_load_is_fresh(self, store: MailStore) -> None:
        """Loading twice gives independent stores."""
        store["bob"].messages.clear()
        assert len(MailStore.load_samples()["bob"].messages) == 2


class TestMessage:
    def test_rejects_bare_lf(self) -> None:
        """Message data must already be CRLF."""
        with pytest.raises(ValueError, match="CRLF"):
            Message(b"Subject: x\n\nbody\n", "u1")

    @pytest.mark.parametrize("uid", ["", "has space", "x" * 71, "caf\u00e9"])
    def test_rejects_bad_uid(self, uid: str) -> None:
        """A UIDL must be 1-70 printable ASCII characters."""
        with pytest.raises(ValueError, match="unique-id"):
            Message(b"x\r\n", uid)

    def test_from_raw_normalises(self) -> None:
        """Any mix of LF, CR and CRLF becomes CRLF, with a final CRLF."""
        assert Message.from_raw(b"a\nb\r\nc\rd", "u").data == b"a\r\nb\r\nc\r\nd\r\n"
        assert normalize_crlf(b"") == b""


class TestStuff:
    def test_stuffs_only_line_starts(self) -> None:
        """A '.' at a line start is doubled; a '.' elsewhere is not; then '.CRLF'."""
        assert stuff(b".\r\n..x\r\na.b\r\n...and then\r\n") == (
            b"..\r\n...x\r\na.b\r\n....and then\r\n.\r\n"
        )

    @given(
        st.lists(
            st.one_of(
                st.sampled_from([b".", b"..", b".x", b"", b"...and then", b" ."]),
                st.binary(max_size=12).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b"")),
            ),
            max_size=12,
        )
    )
    def test_retr_round_trip(self, lines: list[bytes]) -> None:
        """RETR of any message unstuffs to exactly the stored bytes."""
        data = b"".join(line + b"\r\n" for line in lines)
        store = MailStore([Mailbox("u", "p", [Message(data, "m1")])])
        session = DemoSession(store)
        run(session, b"USER u")
        run(session, b"PASS p")
        status, body = unstuff_multiline(run(session, b"RETR 1\r\n"))
        assert body == data
        assert status == f"+OK {len(data)} octets".encode()


# -- the session state machine -------------------------------------------------


class TestStates:
    def test_greeting_has_apop_timestamp(self, store: MailStore) -> None:
        """The greeting carries a <pid.counter@popproxy-demo> timestamp, unique per session."""
        a, b = DemoSession(store), DemoSession(store)
        assert a.greeting().startswith(b"+OK ")
        assert a.greeting().endswith(f" {a.timestamp}\r\n".encode())
        assert a.timestamp.endswith("@popproxy-demo>")
        assert a.timestamp != b.timestamp

    @pytest.mark.parametrize(
        "line", ["STAT", "LIST", "RETR 1", "DELE 1", "NOOP", "RSET", "LAST", "TOP 1 1", "UIDL"]
    )
    def test_transaction_commands_refused_before_login(self, store: MailStore, line: str) -> None:
        """TRANSACTION commands get -ERR with a reason in AUTHORIZATION."""
        assert run(DemoSession(store), line.encode()).startswith(b"-ERR ")

    @pytest.mark.parametrize("line", ["USER bob", "PASS builder", "APOP bob x", "AUTH"])
    def test_authorization_commands_refused_after_login(self, store: MailStore, line: str) -> None:
        """Login commands get -ERR in TRANSACTION, and the session stays put."""
        session = logged_in(store)
        assert run(session, line.encode()) == b"-ERR " + line.split()[0].encode() + (
            b" is not allowed after login\r\n"
        )
        assert session.user == "alice"

    def test_unknown_and_malformed(self, store: MailStore) -> None:
        """Unknown verbs, wrong arity and bad numbers are -ERR, not crashes."""
        session = logged_in(store)
        for line in [
            b"XYZZY",
            b"",
            b"STAT 1",
            b"RETR",
            b"TOP 1",
            b"RETR x",
            b"RETR -1",
            b"RETR 0",
            b"RETR 99",
            b"RETR \xef\xbc\x91",
            b"TOP 1 -1",
            b"LIST 1 2",
        ]:
            assert run(session, line).startswith(b"-ERR "), line
        assert session.state is DemoState.TRANSACTION

    def test_commands_are_case_insensitive(self, store: MailStore) -> None:
        """Keywords are case-insensitive (RFC 1939 section 3)."""
        session = DemoSession(store)
        run(session, b"user bob")
        assert run(session, b"pAsS builder").startswith(b"+OK")

    def test_capa_in_both_states(self, store: MailStore) -> None:
        """CAPA is multi-line and identical before and after login."""
        session = DemoSession(store)
        before = run(session, b"CAPA\r\n")
        _, body = unstuff_multiline(before)
        assert body.decode().split("\r\n")[:-1] == list(CAPABILITIES)
        assert {"SASL PLAIN", "PIPELINING", "RESP-CODES", "AUTH-RESP-CODE"} <= set(CAPABILITIES)
        run(session, b"USER bob")
        run(session, b"CAPA")  # CAPA between USER and PASS is legal
        assert run(session, b"PASS builder").startswith(b"+OK")
        assert run(session, b"CAPA") == before

    def test_quit_in_authorization(self, store: MailStore) -> None:
        """QUIT before login says +OK, asks to close and enters no UPDATE state."""
        session = DemoSession(store)
        reply, close = session.handle_line(b"QUIT\r\n")
        assert reply.startswith(b"+OK")
        assert close
        assert session.state is DemoState.AUTHORIZATION
        assert session.handle_line(b"NOOP") == (b"-ERR session is over\r\n", True)

    def test_quit_in_transaction_enters_update(self, store: MailStore) -> None:
        """QUIT after login enters UPDATE, releases the lock and refuses further lines."""
        session = logged_in(store)
        reply, close = session.handle_line(b"QUIT\r\n")
        assert reply.startswith(b"+OK")
        assert close
        assert session.state is DemoState.UPDATE
        assert not store.is_locked("alice")
        assert session.handle_line(b"STAT")[1]


class TestLogin:
    def test_user_pass(self, store: MailStore) -> None:
        """USER/PASS logs in and reports the maildrop."""
        session = DemoSession(store)
        assert run(session, b"USER bob\r\n") == b"+OK send PASS\r\n"
        assert run(session, b"PASS builder\r\n") == b"+OK bob's maildrop has 2 messages (" + (
            str(store["bob"].octets).encode() + b" octets)\r\n"
        )
        assert session.user == "bob"
        assert store.is_locked("bob")

    @pytest.mark.parametrize(("user", "password"), [("bob", "wrong"), ("nobody", "builder")])
    def test_bad_login(self, store: MailStore, user: str, password: str) -> None:
        """A wrong password or unknown user gives -ERR [AUTH], the same for both."""
        session = DemoSession(store)
        assert run(session, f"USER {user}".encode()) == b"+OK send PASS\r\n"
        assert run(session, f"PASS {password}".encode()) == (
            b"-ERR [AUTH] invalid user name or password\r\n"
        )
        assert session.state is DemoState.AUTHORIZATION
        assert run(session, b"PASS builder").startswith(b"-ERR USER first")

    def test_password_may_contain_spaces(self) -> None:
        """PASS takes the rest of the line as the password (RFC 1939 section 7)."""
        store = MailStore([Mailbox("carol", " secret with spaces")])
        session = DemoSession(store)
        run(session, b"USER carol")
        assert run(session, b"PASS  secret with spaces").startswith(b"+OK")

    def test_apop(self, store: MailStore) -> None:
        """APOP accepts md5(timestamp + password) in hex, either case."""
        digest = hashlib.md5((TIMESTAMP + "builder").encode()).hexdigest()
        session = DemoSession(store, timestamp=TIMESTAMP)
        assert run(session, f"APOP bob {digest.upper()}".encode()).startswith(b"+OK")
        assert session.user == "bob"

    def test_apop_wrong_digest(self, store: MailStore) -> None:
        """APOP with a digest for another timestamp fails with [AUTH]."""
        digest = hashlib.md5(("<1.1@elsewhere>" + "builder").encode()).hexdigest()
        session = DemoSession(store, timestamp=TIMESTAMP)
        assert run(session, f"APOP bob {digest}".encode()).startswith(b"-ERR [AUTH]")
        assert run(session, "APOP bob caf\u00e9".encode()).startswith(b"-ERR [AUTH]")

    def test_auth_plain_initial_response(self, store: MailStore) -> None:
        """AUTH PLAIN with an initial response logs in at once."""
        session = DemoSession(store)
        line = f"AUTH PLAIN {plain('', 'bob', 'builder')}\r\n".encode()
        assert run(session, line).startswith(b"+OK")
        assert session.user == "bob"

    def test_auth_plain_continuation(self, store: MailStore) -> None:
        """AUTH PLAIN without one gets '+ ' and the next line is the response."""
        session = DemoSession(store)
        assert run(session, b"auth plain\r\n") == b"+ \r\n"
        assert session.max_line_length == SASL_LINE_LIMIT
        assert run(session, f"{plain('bob', 'bob', 'builder')}\r\n".encode()).startswith(b"+OK")
        assert session.max_line_length == LINE_LIMIT

    def test_auth_cancel(self, store: MailStore) -> None:
        """'*' cancels the exchange with -ERR; the next line is a command again."""
        session = DemoSession(store)
        run(session, b"AUTH PLAIN")
        assert run(session, b"*") == b"-ERR AUTH cancelled\r\n"
        assert session.state is DemoState.AUTHORIZATION
        assert run(session, b"USER bob") == b"+OK send PASS\r\n"

    @pytest.mark.parametrize(
        "response",
        [
            plain("", "bob", "wrong"),
            plain("alice", "bob", "builder"),  # may not act as somebody else
            "=",  # empty
            "not*base64",
            base64.b64encode(b"bob\0builder").decode(),
        ],
    )
    def test_auth_plain_failures(self, store: MailStore, response: str) -> None:
        """Bad credentials or malformed responses give -ERR [AUTH]."""
        session = DemoSession(store)
        assert run(session, f"AUTH PLAIN {response}".encode()).startswith(b"-ERR [AUTH]")
        assert session.state is DemoState.AUTHORIZATION

    def test_auth_mechanism_list_and_unknown_mechanism(self, store: MailStore) -> None:
        """Bare AUTH lists mechanisms (multi-line); unknown ones get -ERR."""
        session = DemoSession(store)
        _, body = unstuff_multiline(run(session, b"AUTH"))
        assert body == b"PLAIN\r\n"
        assert run(session, b"AUTH CRAM-MD5").startswith(b"-ERR")

    def test_mailbox_in_use(self, store: MailStore) -> None:
        """A second login to a locked mailbox gets -ERR [IN-USE] until the first ends."""
        first = logged_in(store, "bob")
        second = DemoSession(store)
        run(second, b"USER bob")
        assert run(second, b"PASS builder").startswith(b"-ERR [IN-USE]")
        assert second.state is DemoState.AUTHORIZATION
        first.close()
        run(second, b"USER bob")
        assert run(second, b"PASS builder").startswith(b"+OK")

    def test_wrong_password_does_not_reveal_lock(self, store: MailStore) -> None:
        """A bad password on a locked mailbox is [AUTH], not [IN-USE]."""
        logged_in(store, "bob")
        session = DemoSession(store)
        run(session, b"USER bob")
        assert run(session, b"PASS nope").startswith(b"-ERR [AUTH]")


class TestTransaction:
    def test_stat_and_list_count_crlf_octets(self, store: MailStore) -> None:
        """STAT and LIST report sizes of the CRLF message."""
        session = logged_in(store)
        messages = store["alice"].messages
        total = sum(len(m.data) for m in messages)
        assert run(session, b"STAT") == f"+OK 4 {total}\r\n".encode()
        _, body = unstuff_multiline(run(session, b"LIST"))
        assert body == b"".join(
            f"{n} {len(m.data)}\r\n".encode() for n, m in enumerate(messages, 1)
        )
        assert run(session, b"LIST 4") == f"+OK 4 {len(messages[3].data)}\r\n".encode()

    def test_uidl(self, store: MailStore) -> None:
        """UIDL lists the stable unique-ids; UIDL n answers on one line."""
        session = logged_in(store)
        _, body = unstuff_multiline(run(session, b"UIDL"))
        uids = [m.uid for m in store["alice"].messages]
        assert body == b"".join(f"{n} {u}\r\n".encode() for n, u in enumerate(uids, 1))
        assert run(session, b"UIDL 2") == f"+OK 2 {uids[1]}\r\n".encode()

    def test_retr_is_stuffed_and_round_trips(self, store: MailStore) -> None:
        """RETR of the dotted message is stuffed on the wire and unstuffs to the data."""
        session = logged_in(store)
        for number, message in enumerate(store["alice"].messages, 1):
            reply = run(session, f"RETR {number}".encode())
            _, body = unstuff_multiline(reply)
            assert body == message.data
        dotted = run(session, b"RETR 3")
        assert b"\r\n....and then" in dotted
        assert b"\r\n..\r\n" in dotted

    def test_top(self, store: MailStore) -> None:
        """TOP n k sends the headers, the blank line and k body lines."""
        session = logged_in(store)
        data = store["alice"].messages[2].data
        head, _, body = data.partition(b"\r\n\r\n")
        _, top0 = unstuff_multiline(run(session, b"TOP 3 0"))
        assert top0 == head + b"\r\n\r\n"
        _, top5 = unstuff_multiline(run(session, b"TOP 3 5"))
        assert top5 == head + b"\r\n\r\n" + b"".join(
            line + b"\r\n" for line in body.split(b"\r\n")[:5]
        )
        _, everything = unstuff_multiline(run(session, b"TOP 3 100000"))
        assert everything == data

    def test_dele_hides_message_but_only_quit_applies_it(self, store: MailStore) -> None:
        """A marked message vanishes from the session; the store changes only on QUIT."""
        session = logged_in(store)
        uid = store["alice"].messages[0].uid
        assert run(session, b"DELE 1") == b"+OK message 1 deleted\r\n"
        assert session.deleted == {1}
        assert run(session, b"STAT").startswith(b"+OK 3 ")
        assert run(session, b"RETR 1").startswith(b"-ERR")
        assert run(session, b"DELE 1").startswith(b"-ERR")
        assert run(session, b"LIST 1").startswith(b"-ERR")
        _, listing = unstuff_multiline(run(session, b"LIST"))
        assert not listing.startswith(b"1 ")
        assert store["alice"].messages[0].uid == uid  # not yet applied
        reply, close = session.handle_line(b"QUIT")
        assert reply == b"+OK popproxy-demo signing off (1 messages deleted)\r\n"
        assert close
        assert [m.uid for m in store["alice"].messages] == [
            "02-newsletter",
            "03-dots",
            "04-access-report",
        ]

    def test_close_without_quit_discards_marks(self, store: MailStore) -> None:
        """A session that just ends removes nothing and releases the lock."""
        session = logged_in(store)
        run(session, b"DELE 1")
        run(session, b"DELE 2")
        session.close()
        session.close()  # idempotent
        assert len(store["alice"].messages) == 4
        assert not store.is_locked("alice")
        assert session.handle_line(b"QUIT")[0].startswith(b"-ERR")
        assert len(store["alice"].messages) == 4

    def test_rset_unmarks(self, store: MailStore) -> None:
        """RSET unmarks all deletions, so QUIT then removes nothing."""
        session = logged_in(store)
        run(session, b"DELE 1")
        run(session, b"DELE 4")
        assert run(session, b"RSET").startswith(b"+OK maildrop has 4 messages")
        assert session.deleted == frozenset()
        assert run(session, b"RETR 1").startswith(b"+OK")
        session.handle_line(b"QUIT")
        assert len(store["alice"].messages) == 4

    def test_last(self, store: MailStore) -> None:
        """LAST is the highest number RETRieved or DELEted; TOP does not count; RSET resets."""
        session = logged_in(store)
        assert run(session, b"LAST") == b"+OK 0\r\n"
        run(session, b"RETR 3")
        run(session, b"RETR 1")
        assert run(session, b"LAST") == b"+OK 3\r\n"
        run(session, b"TOP 4 0")
        assert run(session, b"LAST") == b"+OK 3\r\n"
        run(session, b"DELE 4")
        assert run(session, b"LAST") == b"+OK 4\r\n"
        run(session, b"RSET")
        assert run(session, b"LAST") == b"+OK 0\r\n"

    def test_noop(self, store: MailStore) -> None:
        """NOOP says +OK."""
        assert run(logged_in(store), b"NOOP\r\n") == b"+OK\r\n"


class TestLineLimits:
    def test_line_limit_counts_crlf(self, store: MailStore) -> None:
        """A 1024-octet line (with CRLF) is parsed; 1025 octets is too long."""
        session = DemoSession(store)
        fits = b"USER " + b"x" * (LINE_LIMIT - 7) + b"\r\n"
        assert len(fits) == LINE_LIMIT
        assert run(session, fits) == b"+OK send PASS\r\n"
        assert run(session, b"USER " + b"x" * (LINE_LIMIT - 6) + b"\r\n") == (
            b"-ERR line too long (limit 1024 octets)\r\n"
        )

    @pytest.mark.parametrize("line", [b"US\0ER bob", b"USER b\rob", b"USER \xff\xfe"])
    def test_rejects_nul_cr_and_bad_utf8(self, store: MailStore, line: bytes) -> None:
        """NUL, stray CR and invalid UTF-8 are refused."""
        assert run(DemoSession(store), line).startswith(b"-ERR ")

    def test_overlong_sasl_response_ends_exchange(self, store: MailStore) -> None:
        """A SASL line over its (larger) limit fails the AUTH exchange."""
        session = DemoSession(store)
        run(session, b"AUTH PLAIN")
        assert run(session, b"A" * SASL_LINE_LIMIT).startswith(b"-ERR [AUTH]")
        assert session.max_line_length == LINE_LIMIT


class TestLineBuffer:
    def test_splits_pipelined_lines(self) -> None:
        """Several lines in one read come out one by one, terminators kept."""
        buf = _LineBuffer()
        buf.feed(b"USER a\r\nPASS b\nST")
        assert buf.next_line(100) == b"USER a\r\n"
        assert buf.next_line(100) == b"PASS b\n"
        assert buf.next_line(100) is None
        buf.feed(b"AT\r\n")
        assert buf.next_line(100) == b"STAT\r\n"

    def test_byte_at_a_time(self) -> None:
        """Feeding one byte at a time gives the same lines."""
        buf = _LineBuffer()
        got = []
        for byte in b"NOOP\r\nLIST 1\r\n":
            buf.feed(bytes([byte]))
            if (line := buf.next_line(100)) is not None:
                got.append(line)
        assert got == [b"NOOP\r\n", b"LIST 1\r\n"]

    def test_overlong_line_is_cut_and_its_tail_skipped(self) -> None:
        """An overlong line yields one cut line, then its tail is dropped up to LF."""
        buf = _LineBuffer()
        buf.feed(b"x" * 25)
        assert buf.next_line(10) == b"x" * 10
        assert buf.next_line(10) is None
        buf.feed(b"y" * 5000)
        assert buf.next_line(10) is None
        buf.feed(b"zz\r\nNOOP\r\n")
        assert buf.next_line(10) == b"NOOP\r\n"


# -- over real sockets -----------------------------------------------------------


async def receive_until(stream: trio.abc.ReceiveStream, suffix: bytes) -> bytes:
    data = b""
    while not data.endswith(suffix):
        chunk = await stream.receive_some()
        assert chunk, f"EOF after {data!r}"
        data += chunk
    return data


async def test_poplib_round_trip(nursery: trio.Nursery) -> None:
    """poplib logs in, lists, retrieves, deletes, quits; a new session sees it gone."""
    store = MailStore.load_samples()
    listeners: list[trio.SocketListener] = await nursery.start(serve_demo, store)
    host, port = listeners[0].socket.getsockname()[:2]
    messages = list(store["alice"].messages)

    def first_visit() -> tuple[list[bytes], list[bytes]]:
        client = poplib.POP3(host, port, timeout=10)
        client.user("alice")
        client.pass_("wonderland")
        _, listing, _ = client.list()
        _, lines, _ = client.retr(3)  # the dotted one
        client.dele(1)
        client.quit()
        return listing, lines

    def second_visit() -> tuple[tuple[int, int], list[bytes], bytes]:
        client = poplib.POP3(host, port, timeout=10)
        client.apop("alice", "wonderland")
        stat = client.stat()
        _, uidl, _ = client.uidl()
        _, lines, _ = client.retr(3)  # now the big one
        client.quit()
        return stat, uidl, b"\r\n".join(lines) + b"\r\n"

    with trio.fail_after(20):
        listing, lines = await trio.to_thread.run_sync(first_visit)
        assert listing == [f"{n} {len(m.data)}".encode() for n, m in enumerate(messages, 1)]
        assert b"\r\n".join(lines) + b"\r\n" == messages[2].data
        stat, uidl, big = await trio.to_thread.run_sync(second_visit)
    assert stat == (3, sum(len(m.data) for m in messages[1:]))
    assert uidl == [f"{n} {m.uid}".encode() for n, m in enumerate(messages[1:], 1)]
    assert big == messages[3].data
    assert not store.is_locked("alice")


async def test_pipelined_commands_in_one_write(nursery: trio.Nursery) -> None:
    """Commands sent in one write are answered in order, then the server closes."""
    store = MailStore.load_samples()
    listeners: list[trio.SocketListener] = await nursery.start(serve_demo, store)
    size = store["bob"].octets
    with trio.fail_after(10):
        client = await trio.testing.open_stream_to_socket_listener(listeners[0])
        greeting = await receive_until(client, b"\r\n")
        assert greeting.startswith(b"+OK popproxy-demo")
        await client.send_all(
            b"USER bob\r\nPASS builder\r\nSTAT\r\nDELE 2\r\n"
            + b"X" * (LINE_LIMIT + 500)
            + b"\r\nNOOP\r\nQUIT\r\nNOOP\r\n"
        )
        replies = b""
        while chunk := await client.receive_some():
            replies += chunk
        await client.aclose()
    assert replies.split(b"\r\n")[:-1] == [
        b"+OK send PASS",
        f"+OK bob's maildrop has 2 messages ({size} octets)".encode(),
        f"+OK 2 {size}".encode(),
        b"+OK message 2 deleted",
        b"-ERR line too long (limit 1024 octets)",
        b"+OK",
        b"+OK popproxy-demo signing off (1 messages deleted)",
    ]
    assert [m.uid for m in store["bob"].messages] == ["01-build-schedule"]


async def test_dropped_connection_keeps_messages(nursery: trio.Nursery) -> None:
    """A client that disconnects without QUIT deletes nothing and frees the lock."""
    store = MailStore.load_samples()
    listeners: list[trio.SocketListener] = await nursery.start(serve_demo, store)
    with trio.fail_after(10):
        client = await trio.testing.open_stream_to_socket_listener(listeners[0])
        await receive_until(client, b"\r\n")
        await client.send_all(b"USER archive\r\nPASS archive\r\nDELE 1\r\n")
        await receive_until(client, b"deleted\r\n")
        assert store.is_locked("archive")
        await client.aclose()
        # The server task notices EOF, closes the session, then blocks in accept.
        await trio.testing.wait_all_tasks_blocked(cushion=0.05)
        assert not store.is_locked("archive")
    assert len(store["archive"].messages) == 3
