"""The relay's socket fast path: trio semantics without the extra scheduler pass."""

from __future__ import annotations

import socket

import pytest
import trio
import trio.testing

from popproxy import sockio


async def tcp_pair() -> tuple[trio.SocketStream, trio.SocketStream]:
    listener = (await trio.open_tcp_listeners(0, host="127.0.0.1"))[0]
    async with listener:
        port = listener.socket.getsockname()[1]
        client = await trio.open_tcp_stream("127.0.0.1", port)
        server = await listener.accept()
    assert isinstance(server, trio.SocketStream)
    return client, server


async def test_round_trip_and_eof() -> None:
    a, b = await tcp_pair()
    async with a, b:
        assert await sockio.send_all(a, b"NOOP\r\n", trio.current_time() + 5)
        assert await sockio.receive(b, 1024) == b"NOOP\r\n"
        await a.send_eof()
        assert await sockio.receive(b, 1024) == b""


async def test_receive_is_a_checkpoint() -> None:
    # Data already waiting still goes through the scheduler, so a cancelled
    # scope is honoured and one busy session cannot starve the others.
    a, b = await tcp_pair()
    async with a, b:
        await a.send_all(b"x")
        with trio.CancelScope() as scope:
            scope.cancel()
            await sockio.receive(b, 10)
        assert scope.cancelled_caught
        assert await sockio.receive(b, 10) == b"x"


async def test_reset_peer_is_broken() -> None:
    a, b = await tcp_pair()
    async with b:
        # SO_LINGER 0: close sends a reset instead of a FIN.
        a.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\0\0\0\0\0\0\0")
        await a.aclose()
        with pytest.raises(trio.BrokenResourceError):
            await sockio.receive(b, 10)  # ECONNRESET
        with pytest.raises(trio.BrokenResourceError):
            await sockio.send_all(b, b"x", trio.current_time() + 5)  # EPIPE


async def test_closed_stream() -> None:
    a, b = await tcp_pair()
    await a.aclose()
    await b.aclose()
    with pytest.raises(trio.ClosedResourceError):
        await sockio.receive(a, 10)
    with pytest.raises(trio.ClosedResourceError):
        await sockio.send_all(a, b"x", trio.current_time() + 5)


async def test_full_buffer_waits_then_gives_up_at_the_deadline() -> None:
    # A peer that never reads: the write blocks on a full kernel buffer and
    # returns False at the deadline rather than hanging.
    a, b = await tcp_pair()
    async with a, b:
        a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        b.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        deadline = trio.current_time() + 0.2
        with trio.fail_after(10):
            assert not await sockio.send_all(a, b"x" * (32 << 20), deadline)
        assert trio.current_time() >= deadline


async def test_backpressure_then_everything_arrives() -> None:
    a, b = await tcp_pair()
    payload = bytes(range(256)) * 16384  # 4 MiB: more than the socket buffers
    got = bytearray()

    async def reader() -> None:
        while len(got) < len(payload):
            chunk = await sockio.receive(b, 65536)
            assert chunk
            got.extend(chunk)

    async with a, b:
        with trio.fail_after(30):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(reader)
                assert await sockio.send_all(a, payload, trio.current_time() + 30)
    assert bytes(got) == payload


async def test_other_streams_use_their_own_methods() -> None:
    left, right = trio.testing.memory_stream_pair()
    assert await sockio.send_all(left, b"hello", trio.current_time() + 5)
    assert await sockio.receive(right, 10) == b"hello"
    # A stream that never drains hits the deadline there too.
    left2, _right2 = trio.testing.lockstep_stream_pair()
    assert not await sockio.send_all(left2, b"x", trio.current_time() + 0.05)


async def test_close() -> None:
    a, b = await tcp_pair()
    await sockio.close(a)
    assert a.socket.fileno() == -1
    assert await sockio.receive(b, 10) == b""  # the peer sees EOF
    await sockio.close(a)  # twice is harmless
    left, _right = trio.testing.memory_stream_pair()
    await sockio.close(left)
    with pytest.raises(trio.ClosedResourceError):
        await left.send_all(b"x")
    await b.aclose()
