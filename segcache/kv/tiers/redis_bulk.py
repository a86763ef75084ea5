"""Large Redis values read off the socket straight into one buffer (the Redis tier's chunks).

redis-py's parser copies a bulk reply about four times on its way to a ``bytes``
(``recv`` -> a ``BytesIO`` -> ``read`` -> ``+=`` -> a slice), holding the GIL for
each, and the chunks were then joined once more: reading ~100 MB of KV that way
took about twice as long as this on the 2-core host. ``read_values`` sends one
pipeline, ``STRLEN`` of every key and then ``GET`` of every key, on a connection
of the client's own pool (so connecting, AUTH, SELECT and TLS stay redis-py's),
learns the sizes from the ``STRLEN`` replies, allocates one buffer for all the
values and ``recv_into``s each value's bytes at its place: one copy, out of the
kernel.

Only RESP2 replies are read here: the tier's client asks for protocol 2, and a
connection of another protocol (a ``?protocol=3`` URL wins) goes through
redis-py's pipeline instead. A reply of any other shape, a value whose size
changed between its ``STRLEN`` and its ``GET`` (the tier never rewrites a chunk,
so only another writer could do it), a timeout or a socket error disconnects the
connection (it never goes back to the pool with unread bytes) and raises a
``redis.RedisError``.
"""

from __future__ import annotations

import socket

import redis

from segcache.kv.tiers.buffers import BufferReserve, read_buffer

_LINE_MAX = 1 << 16  # a reply header line is a few bytes; more is not Redis speaking


def read_values(client: redis.Redis, keys: list[str], buffers: BufferReserve | None = None,
                ) -> memoryview | None:
    """The values of ``keys`` end to end in one writable buffer of their own (a ready one
    from ``buffers`` where it fits), or None if a key is missing. Raises
    ``redis.RedisError`` (see the module docstring)."""
    pool = client.connection_pool
    conn = pool.get_connection()
    sock = getattr(conn, "_sock", None)
    if not isinstance(sock, socket.socket) or str(getattr(conn, "protocol", 2)) != "2":
        pool.release(conn)  # RESP3 (a ``?protocol=3`` URL wins over the tier's choice)
        return _read_by_pipeline(client, keys, buffers)
    try:
        conn.send_packed_command(conn.pack_commands([("STRLEN", k) for k in keys]
                                                    + [("GET", k) for k in keys]))
        replies = _Replies(sock)
        sizes = [replies.integer() for _ in keys]
        out = read_buffer(sum(sizes), buffers)
        pos, missing = 0, False
        for size in sizes:
            missing |= not replies.bulk_into(out[pos:pos + size])
            pos += size
        if replies.pending:
            raise redis.ResponseError("unexpected bytes after the replies")
        return None if missing else out
    except BaseException as e:
        conn.disconnect()
        if isinstance(e, TimeoutError):
            raise redis.TimeoutError(f"reading values: {e}") from None
        if isinstance(e, OSError):
            raise redis.ConnectionError(f"reading values: {e}") from None
        raise
    finally:
        pool.release(conn)


def _read_by_pipeline(client: redis.Redis, keys: list[str], buffers: BufferReserve | None,
                      ) -> memoryview | None:
    """``read_values`` through redis-py's parser, joined into one buffer of their own."""
    pipe = client.pipeline(transaction=False)
    for k in keys:
        pipe.get(k)
    parts = pipe.execute()
    if any(p is None for p in parts):
        return None
    out = read_buffer(sum(len(p) for p in parts), buffers)
    pos = 0
    for part in parts:
        out[pos:pos + len(part)] = part
        pos += len(part)
    return out


class _Replies:
    """RESP2 replies in order off ``sock``: integers, and bulk strings into a buffer."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._buf = bytearray()  # bytes received past what was consumed

    @property
    def pending(self) -> int:
        return len(self._buf)

    def integer(self) -> int:
        line = self._line()
        if line[:1] != b":":
            raise _unexpected(line)
        return int(line[1:])

    def bulk_into(self, dest: memoryview) -> bool:
        """The next bulk reply into ``dest`` (which must be its exact size); False for nil."""
        line = self._line()
        if line == b"$-1":
            return False
        if line[:1] != b"$":
            raise _unexpected(line)
        if int(line[1:]) != dest.nbytes:
            raise redis.ResponseError("a value changed size between STRLEN and GET")
        got = min(len(self._buf), dest.nbytes)
        dest[:got] = self._buf[:got]
        del self._buf[:got]
        while got < dest.nbytes:
            n = self._sock.recv_into(dest[got:])
            if n == 0:
                raise redis.ConnectionError("connection closed by the server")
            got += n
        if self._take(2) != b"\r\n":
            raise redis.ResponseError("a bulk reply did not end with CRLF")
        return True

    def _line(self) -> bytes:
        while (end := self._buf.find(b"\r\n")) < 0:
            if len(self._buf) > _LINE_MAX:
                raise redis.ResponseError("reply line too long")
            self._recv()
        line = bytes(self._buf[:end])
        del self._buf[:end + 2]
        return line

    def _take(self, n: int) -> bytes:
        while len(self._buf) < n:
            self._recv()
        out = bytes(self._buf[:n])
        del self._buf[:n]
        return out

    def _recv(self) -> None:
        data = self._sock.recv(_LINE_MAX)
        if not data:
            raise redis.ConnectionError("connection closed by the server")
        self._buf += data


def _unexpected(line: bytes) -> redis.RedisError:
    if line[:1] == b"-":
        return redis.ResponseError(line[1:].decode("utf-8", "replace"))
    return redis.ResponseError(f"unexpected reply {line[:40]!r}")
