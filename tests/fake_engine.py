"""A small vLLM-like KV-event publisher with a true cache model (tests, benches, other helpers).

:class:`FakeEngine` behaves like one vLLM engine as seen from the network:

* an XPUB socket publishing ``[topic, seq (8 bytes BE), payload]`` with seq
  starting at 0, payloads written by :func:`kvroute.adapters.vllm.encode`;
* a ROUTER replay endpoint answering ``[b"", start_seq]`` with every buffered
  batch from ``start_seq`` on and an end marker (current layout with a topic
  frame, or the older one without: ``old_replay_layout``);
* a true cache state: an LRU GPU tier of ``capacity`` blocks and, optionally,
  an LRU host tier of ``host_capacity`` blocks filled by offload
  (placeholder ``BlockStored`` with ``medium="CPU"``, no tokens).

Test knobs: ``publish(drop=True)`` buffers a batch for replay but never sends
it; ``publish(hold=True)`` sends it only at the next ``release_held()`` (a
reorder); ``restart()`` forgets the cache, the buffer and the sequence (like a
new process: engine hashes change too); ``reset_prefix_cache()`` emits
``AllBlocksCleared``.  :meth:`true_blocks` gives the state a perfect index must
hold, in the form of :meth:`kvroute.KVIndex.blocks_of`.

Nothing sleeps: :meth:`serve_replay` and :meth:`wait_for_subscribers` poll
their sockets with timeouts.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Any, Sequence

import xxhash
import zmq

from kvroute.adapters.vllm import encode
from kvroute.kvindex import AllBlocksCleared, BlockRemoved, BlockStored, EventBatch, Tier, block_hash_list

END_SEQ = b"\xff" * 8


class FakeEngine:
    """One simulated engine: cache model + PUB + replay ROUTER (see the module docstring)."""

    def __init__(
        self,
        ctx: zmq.Context,
        *,
        block_size: int = 4,
        capacity: int = 64,
        host_capacity: int = 0,
        hash_mode: str = "int",
        replay_buffer: int = 10_000,
        topic: bytes = b"",
        dp_rank: int | None = 0,
        old_replay_layout: bool = False,
        host: str = "tcp://127.0.0.1",
        seed: int = 0,
    ) -> None:
        if hash_mode not in ("int", "signed", "bytes"):
            raise ValueError(hash_mode)
        self.block_size = block_size  #: tokens per block
        self.capacity = capacity  #: GPU blocks
        self.host_capacity = host_capacity  #: host (CPU offload) blocks; 0 = no host tier
        self.hash_mode = hash_mode  #: how engine hashes go on the wire: unsigned int, signed int or bytes
        self.replay_buffer = replay_buffer  #: batches kept for replay
        self.topic = topic
        self.dp_rank = dp_rank
        self.old_replay_layout = old_replay_layout
        self.seed = seed
        self.pub = ctx.socket(zmq.XPUB)
        self.pub.setsockopt(zmq.LINGER, 0)
        self.pub.setsockopt(zmq.SNDHWM, 0)
        self.pub.setsockopt(zmq.XPUB_VERBOSE, 1)  # report every subscription, also repeated ones
        port = self.pub.bind_to_random_port(host)
        self.endpoint = f"{host}:{port}"  #: connect a SUB here
        self.router = ctx.socket(zmq.ROUTER)
        self.router.setsockopt(zmq.LINGER, 0)
        rport = self.router.bind_to_random_port(host)
        self.replay_endpoint = f"{host}:{rport}"  #: connect a replay DEALER here
        self.epoch = 0  #: restarts so far (salts engine hashes, like a new NONE_HASH)
        self.seq = 0  #: sequence number of the next batch
        self.buffer: OrderedDict[int, bytes] = OrderedDict()  #: seq -> payload, for replay
        self.gpu: OrderedDict[int, None] = OrderedDict()  #: content hash -> None, LRU order (oldest first)
        self.host_tier: OrderedDict[int, None] = OrderedDict()
        self.held: list[tuple[int, bytes]] = []  #: batches sent late (reorder)
        self.events: list[Any] = []  #: events of the step being built
        self.ts = 1_700_000_000.0  #: timestamp of the next batch (advances 1 ms a batch)
        self.replays_served = 0

    # --------------------------------------------------------------- hashing
    def engine_hash(self, content: int) -> Any:
        """The engine's opaque name of a block (a function of content and epoch)."""
        h = xxhash.xxh3_64_intdigest(content.to_bytes(8, "little"), seed=0xE0 + self.epoch * 7919 + self.seed)
        if self.hash_mode == "bytes":
            return xxhash.xxh3_128_digest(content.to_bytes(8, "little"), seed=self.epoch) * 2
        if self.hash_mode == "signed":
            return h - (1 << 64) if h >= 1 << 63 else h
        return h

    # ----------------------------------------------------------- cache model
    def request(self, tokens: Sequence[int], *, lora_name: str | None = None) -> int:
        """Serve one prompt: hit the cached prefix, cache the rest (evicting LRU); returns hit blocks."""
        bs = self.block_size
        hs = block_hash_list(list(tokens), bs, lora_name=lora_name)
        hit = 0
        for c in hs:
            if c not in self.gpu:
                break
            self.gpu.move_to_end(c)
            hit += 1
        new = hs[hit:][: self.capacity]
        if not new:
            return hit
        protect = set(hs)
        missing = [c for c in new if c not in self.gpu]
        evicted = []
        while len(self.gpu) + len(missing) > self.capacity:
            victim = next((c for c in self.gpu if c not in protect), None)
            if victim is None:
                break
            del self.gpu[victim]
            evicted.append(victim)
        if evicted:
            self.events.append(BlockRemoved(tuple(self.engine_hash(c) for c in evicted), Tier.GPU))
        for c in new:
            self.gpu[c] = None
            self.gpu.move_to_end(c)
        # Announce each run of blocks this cache did not hold, chained on the block before it.
        # (A block still cached behind a hole is touched, not announced: announcing it again
        # would mean a second physical copy, which this one-copy model never holds.)
        held_before = set(new) - set(missing)
        i = hit
        end = hit + len(new)
        while i < end:
            if hs[i] in held_before:
                i += 1
                continue
            j = i
            while j < end and hs[j] not in held_before:
                j += 1
            run = hs[i:j]
            parent = self.engine_hash(hs[i - 1]) if i else None
            self.events.append(BlockStored(
                tuple(self.engine_hash(c) for c in run), parent, tuple(tokens[i * bs : j * bs]), bs, Tier.GPU,
                lora_name=lora_name, extra_keys=tuple((lora_name,) for _ in run) if lora_name else None,
            ))
            i = j
        if self.host_capacity:
            self._offload(new)
        return hit

    def _offload(self, blocks: list[int]) -> None:
        fresh = [c for c in blocks if c not in self.host_tier]
        for c in blocks:
            self.host_tier[c] = None
            self.host_tier.move_to_end(c)
        gone = []
        while len(self.host_tier) > self.host_capacity:
            c, _ = self.host_tier.popitem(last=False)
            gone.append(c)
        fresh = [c for c in fresh if c in self.host_tier]
        if fresh:
            self.events.append(BlockStored(tuple(self.engine_hash(c) for c in fresh), None, (), 0, Tier.HOST))
        if gone:
            self.events.append(BlockRemoved(tuple(self.engine_hash(c) for c in gone), Tier.HOST))

    def reset_prefix_cache(self) -> None:
        """Drop every cached block (all tiers) and announce it."""
        self.gpu.clear()
        self.host_tier.clear()
        self.events.append(AllBlocksCleared())

    def true_blocks(self) -> dict[int, frozenset[Tier]]:
        """Content hash -> tiers: what an exact index must hold for this engine."""
        out: dict[int, set[Tier]] = {}
        for c in self.gpu:
            out.setdefault(c, set()).add(Tier.GPU)
        for c in self.host_tier:
            out.setdefault(c, set()).add(Tier.HOST)
        return {c: frozenset(t) for c, t in out.items()}

    # -------------------------------------------------------------- publishing
    def publish(self, *, drop: bool = False, hold: bool = False, events: Sequence[Any] | None = None,
                payload: bytes | None = None) -> int:
        """Close the current step as one batch and send it; returns its seq.

        ``drop``: buffered for replay but never sent.  ``hold``: sent at the next
        :meth:`release_held`.  ``events``/``payload`` override the step's events /
        the encoded bytes (to inject hand-made or malformed batches).
        """
        evs = tuple(self.events if events is None else events)
        self.events = []
        seq = self.seq
        self.seq += 1
        self.ts += 0.001
        if payload is None:
            payload = encode(EventBatch(self.ts, evs, self.dp_rank))
        self.buffer[seq] = payload
        while len(self.buffer) > self.replay_buffer:
            self.buffer.popitem(last=False)
        if hold:
            self.held.append((seq, payload))
        elif not drop:
            self._send(seq, payload)
        return seq

    def release_held(self) -> None:
        for seq, payload in self.held:
            self._send(seq, payload)
        self.held = []

    def _send(self, seq: int, payload: bytes) -> None:
        self.pub.send_multipart([self.topic, seq.to_bytes(8, "big"), payload])

    def restart(self) -> None:
        """A new engine process on the same ports: empty cache, seq 0, empty replay buffer, new hashes."""
        self.gpu.clear()
        self.host_tier.clear()
        self.events = []
        self.held = []
        self.buffer.clear()
        self.seq = 0
        self.epoch += 1

    # ------------------------------------------------------------------ sockets
    def serve_replay(self, timeout_ms: int = 0) -> int:
        """Answer every replay request waiting (or arriving within ``timeout_ms``); returns requests served."""
        served = 0
        while self.router.poll(timeout_ms if served == 0 else 0, zmq.POLLIN):
            frames = self.router.recv_multipart()
            if len(frames) != 3 or frames[1] != b"" or len(frames[2]) != 8:
                continue
            ident, start = frames[0], int.from_bytes(frames[2], "big")
            for seq, payload in self.buffer.items():
                if seq >= start:
                    self._reply(ident, seq.to_bytes(8, "big"), payload)
            self._reply(ident, END_SEQ, b"")
            served += 1
        self.replays_served += served
        return served

    def _reply(self, ident: bytes, seq8: bytes, payload: bytes) -> None:
        if self.old_replay_layout:
            self.router.send_multipart([ident, b"", seq8, payload])
        else:
            self.router.send_multipart([ident, b"", self.topic if seq8 != END_SEQ else b"", seq8, payload])

    def wait_for_subscribers(self, n: int = 1, timeout_ms: int = 5000) -> bool:
        """Read XPUB subscription messages until ``n`` subscriptions arrived (avoids the slow-joiner loss)."""
        seen = 0
        while seen < n and self.pub.poll(timeout_ms, zmq.POLLIN):
            msg = self.pub.recv()
            if msg[:1] == b"\x01":
                seen += 1
        return seen >= n

    def close(self) -> None:
        self.pub.close(linger=0)
        self.router.close(linger=0)
