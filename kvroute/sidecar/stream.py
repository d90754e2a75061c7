"""The sidecar's stream transport: length-prefixed msgpack over a Unix or TCP socket, read and
answered by the request loop's own thread.

Why a second transport.  A request over ZMQ crosses libzmq's I/O thread twice on each side: the
client's I/O thread writes it, the server's I/O thread reads it and wakes the request loop, which
hands the reply back to the I/O thread to write, and the client's I/O thread wakes the client.
On a small machine those wake-ups cost more CPU than the decision itself (bench/sidecar.py, issue
14).  Here the request loop reads the socket and writes the reply itself: one wake-up per batch of
requests on each side.  The ZMQ ROUTER socket stays, unchanged; this listener is optional
(``stream_bind``).

Wire format (docs/protocol.md, "Stream transport")::

    frame   : length (4 bytes, unsigned big-endian) + payload (length bytes)
    payload : the same msgpack request / reply maps as on the ZMQ socket

Replies come back on the request's connection in request order (pipelining allowed; a client may
also match them by ``id``).  A frame longer than :data:`MAX_FRAME_BYTES` gets a ``BadRequest`` reply
and the connection is closed (its byte stream cannot be resynchronised).  A client that stops
reading its replies is disconnected once :data:`MAX_BUFFERED_BYTES` wait for it.

Addresses: ``unix:///path/to.sock`` (the socket file is created at bind, removed at close; a stale
file nobody listens on is replaced) or ``tcp://host:port`` (port 0: any free port).

Who touches what: only the request loop's thread calls :meth:`StreamListener.serve`,
:meth:`StreamListener.send` and :meth:`StreamListener.close`.
"""
from __future__ import annotations

import errno
import logging
import os
import select
import socket
from typing import Any, Callable

import msgpack

from .decode import MAX_TOKENS
from .errors import ConfigError

log = logging.getLogger("kvroute.sidecar")

#: Largest frame payload: a maximal prompt (2**21 uint32 tokens, or an int array of up to 5 bytes per
#: token) plus the request's other fields.
MAX_FRAME_BYTES = 5 * MAX_TOKENS + (1 << 20)
#: Replies buffered for one connection beyond which it is closed (a client that does not read).
MAX_BUFFERED_BYTES = 64 << 20
#: Bytes of partly received long frames over all connections; a connection whose frame would pass it
#: gets a ``BadRequest`` and is closed (many clients each announcing a maximal frame cannot make the
#: server allocate without bound).
MAX_PENDING_FRAME_BYTES = 256 << 20
#: Bytes read from one connection per turn of the loop (others get their turn; epoll reports it again).
READ_PER_TURN = 1 << 20
#: Frames at least this long are received into their own buffer (no copy out of the read buffer).
_OWN_BUFFER_BYTES = 64 << 10
_HDR = 4


def parse_stream_address(address: str) -> tuple[int, Any]:
    """``unix:///path`` or ``tcp://host:port`` -> (socket family, address); ConfigError otherwise."""
    if address.startswith("unix://"):
        path = address[len("unix://"):]
        if not path:
            raise ConfigError(f"stream address {address!r}: no socket path")
        return socket.AF_UNIX, path
    if address.startswith("tcp://"):
        host, sep, port = address[len("tcp://"):].rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 <= int(port) < 65536:
            raise ConfigError(f"stream address {address!r}: want tcp://host:port (port 0: any free port)")
        host = host.strip("[]")
        return (socket.AF_INET6 if ":" in host else socket.AF_INET), (host, int(port))
    raise ConfigError(f"stream address {address!r}: want unix:///path or tcp://host:port")


def frame(payload: bytes) -> bytes:
    """One frame of the stream transport (the 4-byte length, then the payload)."""
    return len(payload).to_bytes(_HDR, "big") + payload


class _Conn:
    """One client connection (its read state and unsent replies)."""

    __slots__ = ("sock", "key", "buf", "big", "got", "out", "closing")

    def __init__(self, sock: socket.socket, key: int) -> None:
        self.sock = sock
        #: This connection's key in the server's per-client bookkeeping (never reused).
        self.key = key
        #: Bytes read and not yet framed.
        self.buf = bytearray()
        #: A long frame being received into its own buffer (``got`` bytes so far), or None.
        self.big: bytearray | None = None
        self.got = 0
        #: Reply bytes the socket did not take yet.
        self.out = bytearray()
        #: Close once ``out`` is written (a frame too long to skip was answered).
        self.closing = False


class StreamListener:
    """The stream transport's listening socket and connections (module docstring)."""

    def __init__(self, address: str) -> None:
        family, addr = parse_stream_address(address)
        self._family = family
        self._path = addr if family == socket.AF_UNIX else None
        ls = socket.socket(family, socket.SOCK_STREAM)
        try:
            if self._path is not None:
                _remove_stale_socket(self._path)
            else:
                ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            ls.bind(addr)
            ls.listen(1024)
            ls.setblocking(False)
        except OSError as exc:
            ls.close()
            raise ConfigError(f"cannot bind the stream transport to {address!r}: {exc}") from None
        self._ls = ls
        #: The address actually bound (``tcp://host:0`` resolved to the port).
        if self._path is not None:
            self.address = address
        else:
            host, port = ls.getsockname()[:2]
            self.address = f"tcp://[{host}]:{port}" if ":" in host else f"tcp://{host}:{port}"
        self._ep = select.epoll()
        self._ep.register(ls.fileno(), select.EPOLLIN)
        #: fd -> connection; key -> connection.
        self._by_fd: dict[int, _Conn] = {}
        self._by_key: dict[int, _Conn] = {}
        self._next_key = 0
        #: Connections closed for a frame over the limit, or for replies left unread.
        self.dropped_connections = 0
        #: Replies whose connection had gone (a big request's reply after the client left).
        self.dropped_replies = 0
        #: Bytes held by partly received long frames (bounded by MAX_PENDING_FRAME_BYTES).
        self._pending_bytes = 0

    def fileno(self) -> int:
        """An fd readable when some connection is (the epoll set): register it in the loop's poller."""
        return self._ep.fileno()

    @property
    def connections(self) -> int:
        return len(self._by_fd)

    # ------------------------------------------------------------------ loop side
    def serve(self, dispatch: Callable[[int, Any], bytes | None]) -> None:
        """Accept, read, answer and write what is ready now (never blocks).

        ``dispatch(key, payload)`` answers one request: the reply payload, or None when the reply
        comes later through :meth:`send` (a big request handled beside the loop)."""
        for fd, ev in self._ep.poll(0):
            if fd == self._ls.fileno():
                self._accept()
                continue
            c = self._by_fd.get(fd)
            if c is None:
                continue
            if ev & (select.EPOLLERR | select.EPOLLHUP) and not ev & select.EPOLLIN:
                self._close(c)
                continue
            if ev & select.EPOLLOUT:
                self._flush(c)
                if c.sock is None:
                    continue
            if ev & select.EPOLLIN:
                self._read(c, dispatch)

    def send(self, key: int, reply: bytes) -> None:
        """Queue one reply on connection ``key`` (dropped, and counted, when it has closed)."""
        c = self._by_key.get(key)
        if c is None:
            self.dropped_replies += 1
            return
        self._write(c, frame(reply))

    def close(self) -> None:
        for c in list(self._by_fd.values()):
            self._close(c)
        self._ep.close()
        self._ls.close()
        if self._path is not None:
            try:
                os.unlink(self._path)
            except OSError:
                pass

    # ------------------------------------------------------------------ internals
    def _accept(self) -> None:
        while True:
            try:
                s, _ = self._ls.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # e.g. out of file descriptors: keep serving the others
                log.warning("stream transport: accept failed: %s", exc)
                return
            s.setblocking(False)
            if self._family != socket.AF_UNIX:
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._next_key += 1
            c = _Conn(s, self._next_key)
            self._by_fd[s.fileno()] = c
            self._by_key[c.key] = c
            self._ep.register(s.fileno(), select.EPOLLIN)

    def _read(self, c: _Conn, dispatch: Callable[[int, Any], bytes | None]) -> None:
        replies: list[bytes] = []
        budget = READ_PER_TURN
        eof = False
        while budget > 0 and not c.closing:
            try:
                if c.big is not None:
                    n = c.sock.recv_into(memoryview(c.big)[c.got:], min(budget, len(c.big) - c.got))
                    if n:
                        c.got += n
                        if c.got == len(c.big):
                            payload, c.big = memoryview(c.big), None
                            self._pending_bytes -= len(payload)
                            self._answer(c, payload, dispatch, replies)
                else:
                    data = c.sock.recv(min(budget, 256 << 10))
                    n = len(data)
                    if n:
                        c.buf += data
                        self._frames(c, dispatch, replies)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                eof = True
                break
            if not n:
                eof = True
                break
            budget -= n
        if replies:
            self._write(c, b"".join(replies))
        if eof and c.sock is not None:
            self._close(c)  # replies to its big requests still in the lane are dropped (counted)
        elif c.closing and c.sock is not None:  # its error reply still being written: read no more
            self._ep.modify(c.sock.fileno(), select.EPOLLOUT)

    def _frames(self, c: _Conn, dispatch: Callable[[int, Any], bytes | None], replies: list[bytes]) -> None:
        buf = c.buf
        at = 0
        while len(buf) - at >= _HDR:
            n = int.from_bytes(buf[at:at + _HDR], "big")
            start = at + _HDR
            partial = len(buf) - start < n and n >= _OWN_BUFFER_BYTES
            if n > MAX_FRAME_BYTES or (partial and self._pending_bytes + n > MAX_PENDING_FRAME_BYTES):
                why = (f"frame of {n} bytes; at most {MAX_FRAME_BYTES}" if n > MAX_FRAME_BYTES else
                       f"frame of {n} bytes refused: {self._pending_bytes} bytes of other frames are being received")
                replies.append(frame(msgpack.packb({"id": None, "ok": False, "error": {"type": "BadRequest",
                                                                                       "message": why}})))
                c.closing = True
                at = len(buf)
                break
            if len(buf) - start < n:
                if partial:  # receive the rest straight into the frame's own buffer
                    self._pending_bytes += n
                    c.big = bytearray(n)
                    have = len(buf) - start
                    c.big[:have] = buf[start:]
                    c.got = have
                    at = len(buf)
                break
            self._answer(c, buf[start:start + n], dispatch, replies)
            at = start + n
        if at:
            del buf[:at]

    def _answer(self, c: _Conn, payload: Any, dispatch: Callable[[int, Any], bytes | None],
                replies: list[bytes]) -> None:
        reply = dispatch(c.key, payload)
        if reply is not None:
            replies.append(len(reply).to_bytes(_HDR, "big"))
            replies.append(reply)

    def _write(self, c: _Conn, data: bytes) -> None:
        if c.sock is None:
            return
        if c.out:
            c.out += data
        else:
            try:
                sent = c.sock.send(data)
            except (BlockingIOError, InterruptedError):
                sent = 0
            except OSError:
                self._close(c)
                return
            if sent == len(data):
                if c.closing:
                    self._close(c)
                return
            c.out += data[sent:]
            self._ep.modify(c.sock.fileno(), select.EPOLLIN | select.EPOLLOUT)
        if len(c.out) > MAX_BUFFERED_BYTES:
            log.warning("stream transport: closing a connection that left %d bytes of replies unread", len(c.out))
            self.dropped_connections += 1
            self._close(c)

    def _flush(self, c: _Conn) -> None:
        try:
            sent = c.sock.send(c.out)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._close(c)
            return
        del c.out[:sent]
        if not c.out:
            if c.closing:
                self._close(c)
                return
            self._ep.modify(c.sock.fileno(), select.EPOLLIN)

    def _close(self, c: _Conn) -> None:
        if c.sock is None:
            return
        if c.big is not None:
            self._pending_bytes -= len(c.big)
            c.big = None
        if c.closing:
            self.dropped_connections += 1
        fd = c.sock.fileno()
        try:
            self._ep.unregister(fd)
        except OSError:
            pass
        self._by_fd.pop(fd, None)
        self._by_key.pop(c.key, None)
        c.sock.close()
        c.sock = None  # type: ignore[assignment]


def _remove_stale_socket(path: str) -> None:
    """Remove a socket file nobody listens on (left by a killed server); refuse to replace anything else."""
    if not os.path.exists(path):
        return
    import stat

    if not stat.S_ISSOCK(os.stat(path).st_mode):
        raise OSError(errno.EEXIST, f"{path} exists and is not a socket")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except (ConnectionRefusedError, FileNotFoundError):
        os.unlink(path)
        return
    finally:
        probe.close()
    raise OSError(errno.EADDRINUSE, f"{path}: another server listens on it")
