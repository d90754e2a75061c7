"""Mooncake-format request traces: loading, validation and reshaping.

One reader for every part that replays traces (the simulator, the eviction
replay and benches).  It stands beside the ground floor: it imports only
:mod:`kvroute.kvindex`, so :mod:`kvroute.eviction` and :mod:`kvroute.sim` can
both use it.

A trace is one JSON object a line::

    {"timestamp": ms since start, "input_length": tokens, "output_length": tokens,
     "hash_ids": [block ids]}

``hash_ids`` are prefix-chained block ids (equal ids at equal positions mean an
equal prefix up to and including that block), so the simulator uses them
directly as block hashes: as the content hashes of the router's index and as
the engine hashes of the workers' caches.

A trace is named by a path or by a bundled name (:data:`BUNDLED`), see
``kvroute/data/TRACES.md`` for provenance.  A bad line raises
:class:`TraceError` carrying its 1-based line number.
"""
from __future__ import annotations

import gzip
import json
import logging
import math
import os
from dataclasses import dataclass, replace
from importlib import resources
from typing import Iterable, Sequence

from .kvindex.errors import KVRouteError

log = logging.getLogger("kvroute.traces")

#: Bundled trace name -> file in ``kvroute/data``.
BUNDLED = {
    "conversation": "mooncake_conversation.jsonl",
    "synthetic": "mooncake_synthetic.jsonl",
    "agentic": "agentic_coding_dev.jsonl.gz",
}

#: Tokens per hash id of bundled traces that do not use Mooncake's 512.
BUNDLED_BLOCK_TOKENS = {"agentic": 64}

#: Tokens per hash id in the Mooncake release.
MOONCAKE_BLOCK_TOKENS = 512


class TraceError(KVRouteError, ValueError):
    """A trace that cannot be read: missing file or a malformed line.

    ``line`` is the 1-based line number of the bad line (None for file-level errors);
    ``source`` names the trace.
    """

    def __init__(self, message: str, *, source: str = "", line: int | None = None) -> None:
        where = f"{source}:{line}: " if line is not None else (f"{source}: " if source else "")
        super().__init__(where + message)
        #: 1-based line number of the offending line, or None.
        self.line = line
        #: The trace's path or bundled name.
        self.source = source


@dataclass(frozen=True, slots=True)
class Request:
    """One request of a workload, as the simulator replays it.

    Created by :func:`load_trace` or :mod:`kvroute.sim.workloads`; never mutated.
    """

    #: Position in the workload (0-based, unique); also the router's request id.
    request_id: int
    #: Arrival time in seconds since the workload's start (before rate scaling).
    arrival_s: float
    #: Prompt length in tokens.
    input_length: int
    #: Tokens to generate (the first one is produced by the prefill).
    output_length: int
    #: Prefix-chained block ids of the prompt (the last block may be partial).
    hash_ids: tuple[int, ...]
    #: Optional session (conversation / agent) id, for generated workloads; -1 when unknown.
    session: int = -1


def resolve_trace(trace: str | os.PathLike[str]) -> str:
    """Path of a trace given as a path or a bundled name (``conversation``, ``synthetic``, or a
    bundled file's name such as ``mooncake_conversation.jsonl``)."""
    name = os.fspath(trace)
    if not os.path.exists(name):
        for short, file in BUNDLED.items():
            if name in (short, file, file.removesuffix(".gz").removesuffix(".jsonl")):
                return str(resources.files("kvroute").joinpath("data", file))
        raise TraceError(f"no such trace file (bundled names: {', '.join(sorted(BUNDLED))})", source=name)
    return name


def _int_field(obj: dict, key: str, source: str, lineno: int, *, minimum: int = 0) -> int:
    if key not in obj:
        raise TraceError(f"missing field {key!r}", source=source, line=lineno)
    v = obj[key]
    if isinstance(v, float) and v.is_integer():
        v = int(v)
    if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
        raise TraceError(f"field {key!r} must be an integer >= {minimum}, got {v!r}", source=source, line=lineno)
    return v


def parse_lines(lines: Iterable[str], *, source: str = "<trace>", limit: int | None = None) -> list[Request]:
    """Parse Mooncake JSONL lines into requests sorted by arrival (stable).

    Blank lines are skipped.  ``limit`` keeps the first N requests of the file.
    Raises :class:`TraceError` with the line number of the first bad line.
    """
    out: list[Request] = []
    back, first_back, latest = 0, 0, -math.inf
    for lineno, raw in enumerate(lines, 1):
        if limit is not None and len(out) >= limit:
            break
        s = raw.strip()
        if not s:
            continue
        try:
            obj = json.loads(s)
        except json.JSONDecodeError as exc:
            raise TraceError(f"not valid JSON ({exc.msg})", source=source, line=lineno) from None
        if not isinstance(obj, dict):
            raise TraceError("a trace line must be a JSON object", source=source, line=lineno)
        ts = obj.get("timestamp")
        if isinstance(ts, bool) or not isinstance(ts, (int, float)) or not math.isfinite(ts) or ts < 0:
            raise TraceError(f"field 'timestamp' must be a number >= 0 (ms), got {ts!r}", source=source, line=lineno)
        inp = _int_field(obj, "input_length", source, lineno, minimum=1)
        outp = _int_field(obj, "output_length", source, lineno, minimum=0)
        hs = obj.get("hash_ids")
        if not isinstance(hs, list) or not hs:
            raise TraceError("field 'hash_ids' must be a non-empty list of block ids", source=source, line=lineno)
        for h in hs:
            if isinstance(h, bool) or not isinstance(h, int) or h < 0 or h >= 1 << 64:
                raise TraceError(f"hash id {h!r} is not an unsigned 64-bit integer", source=source, line=lineno)
        out.append(Request(len(out), float(ts) / 1000.0, inp, outp, tuple(hs)))
        if ts < latest:
            back += 1
            first_back = first_back or lineno
        latest = max(latest, ts)
    if not out and limit != 0:
        raise TraceError("the trace has no requests (an empty file, or only blank lines)", source=source)
    if back:  # replayed in arrival order; the file's own order is not kept, so say so
        log.warning("%s: %d of %d requests have a timestamp earlier than a line before them (first at line %d); "
                    "they are replayed sorted by timestamp", source, back, len(out), first_back)
    out.sort(key=lambda r: r.arrival_s)
    return [r if r.request_id == i else replace(r, request_id=i) for i, r in enumerate(out)]


def load_trace(trace: str | os.PathLike[str], *, limit: int | None = None) -> list[Request]:
    """Load a Mooncake-format trace from a path (``.gz``: gzip) or a bundled name (see :data:`BUNDLED`)."""
    path = resolve_trace(trace)
    try:
        with (gzip.open(path, "rt", encoding="utf-8") if path.endswith(".gz") else open(path, encoding="utf-8")) as f:
            return parse_lines(f, source=os.fspath(trace), limit=limit)
    except (OSError, EOFError) as exc:  # gzip: a bad or truncated file raises BadGzipFile (OSError) or EOFError
        raise TraceError(f"cannot read trace: {exc}", source=os.fspath(trace)) from exc
    except UnicodeDecodeError as exc:
        raise TraceError(f"not UTF-8 text ({exc.reason} at byte {exc.start} of a read chunk)",
                         source=os.fspath(trace)) from None


def reshape(requests: Sequence[Request], *, block_tokens: int, max_blocks: int | None = None) -> list[Request]:
    """Treat each hash id as a full block of ``block_tokens`` tokens, keeping the first ``max_blocks``.

    This is how the fidelity replay against vLLM was built (blocks of 32 tokens,
    56 blocks per request): prompts become whole blocks, so every block is cacheable.
    """
    out = []
    for r in requests:
        hs = r.hash_ids if max_blocks is None else r.hash_ids[:max_blocks]
        out.append(replace(r, hash_ids=hs, input_length=len(hs) * block_tokens))
    return out


def ideal_hit_ratio(requests: Iterable[Request]) -> float:
    """Block hit ratio of an infinite cache: 1 - unique blocks / block accesses.

    Exact for prefix-chained ids (a seen id implies its whole prefix was seen).
    """
    seen: set[int] = set()
    total = 0
    for r in requests:
        total += len(r.hash_ids)
        seen.update(r.hash_ids)
    return 1.0 - len(seen) / total if total else 0.0


def write_trace(requests: Iterable[Request], path: str | os.PathLike[str]) -> None:
    """Write requests as Mooncake JSONL (timestamps in integer ms)."""
    with open(path, "w", encoding="utf-8") as f:
        for r in requests:
            f.write(json.dumps({
                "timestamp": int(round(r.arrival_s * 1000)),
                "input_length": r.input_length,
                "output_length": r.output_length,
                "hash_ids": list(r.hash_ids),
            }) + "\n")
