"""Sync over one Redis/Valkey stream (``XADD`` / ``XREAD BLOCK`` / ``XRANGE``), with redis-py.

Why a stream and not pub/sub (docs/replicas.md): a stream is one total order
with ids, so a reader that reconnects continues from its last id and loses
nothing the server still holds, and a starting replica reads the last seconds
(``XRANGE`` from a time-based id) to learn who is alive; pub/sub drops
whatever is published while a subscriber is disconnected.  The stream is
capped (``MAXLEN ~ maxlen``): sync messages are only needed for a lease, and
anything older is recovered by asking peers for their state.

A reader's cursor is the last id it read (``0-0`` for a missing stream: a
restarted server's new ids are time-based, so they follow the old ones).
Connection errors become :class:`SyncUnavailable`.
"""
from __future__ import annotations

import time
from typing import Any

from .transport import SyncUnavailable

try:  # optional dependency: the "sync" extra
    import redis
    from redis import exceptions as _rexc
except ImportError:  # pragma: no cover - exercised where redis-py is missing
    redis = None  # type: ignore[assignment]

#: Default stream key.
DEFAULT_STREAM = "kvroute:sync"


class RedisTransport:
    """A :class:`kvroute.sync.transport.SyncTransport` over a Redis stream."""

    def __init__(self, url: str = "redis://127.0.0.1:6379/0", *, stream: str = DEFAULT_STREAM,
                 maxlen: int = 100_000, timeout_s: float = 1.0) -> None:
        if redis is None:
            raise SyncUnavailable("replica sync over Redis needs redis-py: pip install 'kvroute[sync]'")
        #: The server's URL (redis://host:port/db).
        self.url = url
        self.stream = stream
        self.maxlen = maxlen
        self.timeout_s = timeout_s
        self._r = redis.Redis.from_url(url, socket_timeout=timeout_s + 1.0, socket_connect_timeout=timeout_s,
                                       retry_on_timeout=False)
        self._last: str | None = None
        try:  # the read cursor starts where the channel ends now (as for any reader that joins)
            self._cursor()
        except SyncUnavailable:
            pass  # set on the first call that reaches the server

    def _call(self, fn: Any, *args: Any, **kw: Any) -> Any:
        try:
            return fn(*args, **kw)
        except (_rexc.ConnectionError, _rexc.TimeoutError, _rexc.BusyLoadingError, OSError) as exc:
            raise SyncUnavailable(f"redis {self.url}: {exc}") from None
        except _rexc.ResponseError as exc:  # e.g. the key holds another type
            raise SyncUnavailable(f"redis {self.url}: {exc}") from None

    def _cursor(self) -> str:
        if self._last is None:
            try:
                info = self._call(self._r.xinfo_stream, self.stream)
                last = info.get("last-generated-id") or info.get(b"last-generated-id") or b"0-0"
            except SyncUnavailable as exc:
                if "no such key" not in str(exc).lower():
                    raise
                last = b"0-0"
            self._last = last.decode() if isinstance(last, bytes) else str(last)
        return self._last

    def publish(self, payload: bytes) -> None:
        self._cursor()
        self._call(self._r.xadd, self.stream, {"m": payload}, maxlen=self.maxlen, approximate=True)

    def read(self, timeout_s: float) -> list[bytes]:
        cur = self._cursor()
        res = self._call(self._r.xread, {self.stream: cur}, count=10_000,
                         block=max(1, int(timeout_s * 1000)) if timeout_s > 0 else None)
        out = []
        for _, entries in res or ():
            for eid, fields in entries:
                self._last = eid.decode() if isinstance(eid, bytes) else eid
                p = fields.get(b"m")
                out.append(p if p is not None else b"")  # a foreign entry: the applier counts it malformed
        return out

    def recent(self, seconds: float) -> list[bytes]:
        start = max(0, int((time.time() - seconds) * 1000))
        entries = self._call(self._r.xrange, self.stream, min=f"{start}-0", max="+")
        self._last = None
        cur = self._cursor()
        out = []
        for eid, fields in entries:
            e = eid.decode() if isinstance(eid, bytes) else eid
            if _id_le(e, cur):
                out.append(fields.get(b"m", b""))
        return out

    def close(self) -> None:
        try:
            self._r.close()
        except Exception:  # pragma: no cover - closing a broken connection
            pass


def _id_le(a: str, b: str) -> bool:
    ams, _, aseq = a.partition("-")
    bms, _, bseq = b.partition("-")
    return (int(ams), int(aseq or 0)) <= (int(bms), int(bseq or 0))
