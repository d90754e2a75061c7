"""The sidecar's KV-event source: a thin wrapper of :class:`kvroute.adapters.subscriber.KVEventSubscriber`.

It shares one lock with the router (the subscriber holds it while applying
a batch, the router while reading the index), runs the subscriber's loop in
its daemon thread, and maps the sidecar's worker configuration (data-parallel
ranks, topics) to subscriptions.  A worker with ``dp_size > 1`` appears in the
index and in decisions as ``(id, rank)`` (a msgpack array on the wire).
"""
from __future__ import annotations

import time
from typing import Any, Callable, Iterable

import zmq

from ..adapters.subscriber import KVEventSubscriber
from ..kvindex import KVIndex


class EventSource:
    """Follow / unfollow workers' KV-event endpoints; expose the subscriber's metrics."""

    def __init__(self, index: KVIndex, lock: Any, *, context: zmq.Context | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        #: The subscriber (owns its sockets and loop thread).
        self.subscriber = KVEventSubscriber(index, lock=lock, context=context, clock=clock)
        self.lock = lock

    def start(self) -> None:
        self.subscriber.start()

    def stop(self) -> None:
        """Stop the loop thread: no batch is applied after this returns (sockets stay open)."""
        self.subscriber.stop()

    def follow(self, worker: Any, endpoint: str, replay_endpoint: str | None = None, *, dp_size: int = 1,
               topic: str = "", start_seq: dict[int, int] | None = None, incomplete: Iterable[int] = ()) -> None:
        """Subscribe to a worker; ``start_seq`` ({rank: seq}) resumes its streams over a restored index,
        ``incomplete`` (ranks) those saved incomplete as incomplete."""
        self.subscriber.add_worker(worker, endpoint, replay_endpoint, dp_ranks=range(max(1, dp_size)), topic=topic,
                                   start_seq=start_seq, incomplete=incomplete)

    def positions(self) -> list[tuple[Any, int, int, bool]]:
        """``(worker, rank, next_seq, complete)`` of every stream; read it under the lock, with the index snapshot."""
        return [(w["worker"], w["rank"], w["next_seq"], w["complete"])
                for w in self.subscriber.metrics()["workers"].values()]

    def unfollow(self, worker: Any) -> None:
        if worker in self.subscriber.workers():
            self.subscriber.remove_worker(worker, forget=True)

    def metrics(self) -> dict[str, Any]:
        return self.subscriber.metrics()

    def stale_workers(self) -> set[Any]:
        return self.subscriber.stale_workers()

    def stream_status(self) -> dict[Any, dict[str, Any]]:
        return self.subscriber.stream_status()

    def last_received(self, key: Any) -> float | None:
        return self.subscriber.last_received(key)

    def close(self) -> None:
        self.subscriber.close()
