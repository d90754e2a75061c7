"""Synthetic workload generators that emit the same :class:`~kvroute.traces.Request` records as a trace.

Each generator is seeded and returns requests sorted by arrival, with fresh
prefix-chained block ids (a new block id is never reused after another
predecessor, as in the Mooncake traces):

* :func:`shared_system_prompt` -- a few long system prompts shared by many
  one-shot requests (the llm-d "groups sharing a prompt" benchmark shape).
* :func:`multi_turn_chat` -- conversations whose every turn re-sends the whole
  history plus a new message, after a think time.
* :func:`agent_sessions` -- agents that call tools in quick succession: a long
  shared tool prompt, then many short steps each extending the context.
* :func:`rag_documents` -- retrieval-augmented one-shot questions: a system
  prompt, then retrieved documents from a shared corpus (Zipf popularity), then
  the question; only a prefix of shared documents is reusable.
* :func:`sibling_bursts` -- ``n`` requests with one prompt arriving within
  100 ms (RL rollouts, best-of-n sampling), bursts at a Poisson rate.
* :func:`long_single_shot` -- long prompts (8k-32k tokens) with no reuse.
* :func:`mix` -- the generated families above (and chat) together, interleaved.

Workload families used to judge routing (``docs/results.md``): the bundled
``conversation`` trace (multi-turn chat), the bundled ``agentic`` trace
(agentic coding sessions, 64-token blocks), ``gen:rag_documents``,
``gen:sibling_bursts``, ``gen:long_single_shot`` and ``gen:mix``.

:data:`GENERATORS` maps a name to its function; ``kvroute sim --trace gen:NAME``
uses it with defaults (``gen:NAME:key=value,...`` overrides).
"""
from __future__ import annotations

import inspect
import math
import random
from dataclasses import replace
from typing import Callable

from ..traces import Request, TraceError


class _Ids:
    """Fresh block-id allocator (one per generated workload)."""

    def __init__(self) -> None:
        self.next = 0

    def take(self, n: int) -> tuple[int, ...]:
        start = self.next
        self.next += n
        return tuple(range(start, start + n))


def _finish(reqs: list[Request]) -> list[Request]:
    reqs.sort(key=lambda r: (r.arrival_s, r.session))
    return [replace(r, request_id=i) for i, r in enumerate(reqs)]


def shared_system_prompt(
    n_requests: int = 2000,
    *,
    n_prompts: int = 16,
    system_blocks: int = 12,
    user_blocks: tuple[int, int] = (1, 4),
    rate: float = 8.0,
    output_length: tuple[int, int] = (50, 400),
    zipf: float = 1.0,
    block_tokens: int = 512,
    seed: int = 0,
) -> list[Request]:
    """One-shot requests, each a system prompt (chosen Zipf-like among ``n_prompts``) plus a unique question."""
    rng = random.Random(seed)
    ids = _Ids()
    prompts = [ids.take(system_blocks) for _ in range(n_prompts)]
    weights = [1.0 / (k + 1) ** zipf for k in range(n_prompts)]
    t = 0.0
    out = []
    for _ in range(n_requests):
        t += rng.expovariate(rate)
        g = rng.choices(range(n_prompts), weights)[0]
        hs = prompts[g] + ids.take(rng.randint(*user_blocks))
        inp = len(hs) * block_tokens - rng.randrange(block_tokens)
        out.append(Request(0, t, inp, rng.randint(*output_length), hs, session=g))
    return _finish(out)


def multi_turn_chat(
    n_sessions: int = 400,
    *,
    turns: tuple[int, int] = (1, 8),
    system_blocks: int = 2,
    message_blocks: tuple[int, int] = (1, 3),
    session_rate: float = 1.0,
    think_time_s: float = 60.0,
    output_length: tuple[int, int] = (100, 600),
    block_tokens: int = 512,
    seed: int = 0,
) -> list[Request]:
    """Conversations: every turn re-sends the history (previous turns and answers) plus a new message."""
    rng = random.Random(seed)
    ids = _Ids()
    system = ids.take(system_blocks)
    out = []
    t0 = 0.0
    for s in range(n_sessions):
        t0 += rng.expovariate(session_rate)
        t = t0
        ctx = system
        for _ in range(rng.randint(*turns)):
            ctx = ctx + ids.take(rng.randint(*message_blocks))
            outl = rng.randint(*output_length)
            out.append(Request(0, t, len(ctx) * block_tokens - rng.randrange(block_tokens), outl, ctx, session=s))
            # the answer joins the history of the next turn
            ctx = ctx + ids.take(max(1, outl // block_tokens))
            t += rng.expovariate(1.0 / think_time_s)
    return _finish(out)


def agent_sessions(
    n_sessions: int = 100,
    *,
    steps: tuple[int, int] = (5, 30),
    tool_prompt_blocks: int = 16,
    n_tool_prompts: int = 4,
    step_blocks: tuple[int, int] = (1, 2),
    session_rate: float = 0.5,
    tool_latency_s: float = 2.0,
    output_length: tuple[int, int] = (20, 200),
    block_tokens: int = 512,
    seed: int = 0,
) -> list[Request]:
    """Agents: a long shared tool prompt, then many quick steps each adding a tool result to the context."""
    rng = random.Random(seed)
    ids = _Ids()
    tools = [ids.take(tool_prompt_blocks) for _ in range(n_tool_prompts)]
    out = []
    t0 = 0.0
    for s in range(n_sessions):
        t0 += rng.expovariate(session_rate)
        t = t0
        ctx = rng.choice(tools) + ids.take(1)  # the task
        for _ in range(rng.randint(*steps)):
            outl = rng.randint(*output_length)
            out.append(Request(0, t, len(ctx) * block_tokens - rng.randrange(block_tokens), outl, ctx, session=s))
            ctx = ctx + ids.take(rng.randint(*step_blocks))  # the call and the tool's result
            t += rng.expovariate(1.0 / tool_latency_s)
    return _finish(out)


def rag_documents(
    n_requests: int = 2000,
    *,
    n_docs: int = 400,
    doc_blocks: tuple[int, int] = (4, 12),
    docs_per_request: tuple[int, int] = (2, 4),
    system_blocks: int = 2,
    question_blocks: tuple[int, int] = (1, 2),
    rate: float = 4.0,
    output_length: tuple[int, int] = (100, 400),
    zipf: float = 1.1,
    block_tokens: int = 512,
    seed: int = 0,
) -> list[Request]:
    """RAG: system prompt + retrieved documents (Zipf-popular, ranked order) + a question, one shot each.

    Documents are chunks of a shared corpus; the same document at the same
    position after the same predecessors shares KV (prefix caching reuses only
    a common prefix, so documents after the first match only when the whole
    retrieved list so far matches).
    """
    rng = random.Random(seed)
    ids = _Ids()
    system = ids.take(system_blocks)
    lengths = [rng.randint(*doc_blocks) for _ in range(n_docs)]
    weights = [1.0 / (k + 1) ** zipf for k in range(n_docs)]
    chains: dict[tuple[int, ...], tuple[int, ...]] = {}  # retrieved list -> its block ids (prefix-chained)
    t = 0.0
    out = []
    for _ in range(n_requests):
        t += rng.expovariate(rate)
        k = rng.randint(*docs_per_request)
        picked: list[int] = []
        while len(picked) < k:
            d = rng.choices(range(n_docs), weights)[0]
            if d not in picked:
                picked.append(d)
        hs = system
        for j in range(1, k + 1):
            key = tuple(picked[:j])
            blocks = chains.get(key)
            if blocks is None:
                blocks = chains[key] = ids.take(lengths[picked[j - 1]])
            hs = hs + blocks
        hs = hs + ids.take(rng.randint(*question_blocks))
        inp = len(hs) * block_tokens - rng.randrange(block_tokens)
        out.append(Request(0, t, inp, rng.randint(*output_length), hs, session=picked[0]))
    return _finish(out)


def sibling_bursts(
    n_bursts: int = 300,
    *,
    siblings: tuple[int, int] = (4, 16),
    spread_s: float = 0.1,
    prompt_blocks: tuple[int, int] = (2, 16),
    n_system_prompts: int = 8,
    system_blocks: int = 2,
    rate: float = 3.0,
    output_length: tuple[int, int] = (200, 800),
    block_tokens: int = 512,
    seed: int = 0,
) -> list[Request]:
    """Bursts of ``n`` requests with one prompt, all arriving within ``spread_s`` (RL rollouts, best-of-n)."""
    rng = random.Random(seed)
    ids = _Ids()
    systems = [ids.take(system_blocks) for _ in range(n_system_prompts)]
    t = 0.0
    out = []
    for b in range(n_bursts):
        t += rng.expovariate(rate)
        hs = rng.choice(systems) + ids.take(rng.randint(*prompt_blocks))
        inp = len(hs) * block_tokens - rng.randrange(block_tokens)
        for _ in range(rng.randint(*siblings)):
            out.append(Request(0, t + rng.uniform(0.0, spread_s), inp, rng.randint(*output_length), hs, session=b))
    return _finish(out)


def long_single_shot(
    n_requests: int = 1200,
    *,
    prompt_blocks: tuple[int, int] = (16, 64),
    rate: float = 1.8,
    output_length: tuple[int, int] = (50, 500),
    block_tokens: int = 512,
    seed: int = 0,
) -> list[Request]:
    """Long prompts (8k-32k tokens at 512-token blocks) that share nothing: routing can only balance load."""
    rng = random.Random(seed)
    ids = _Ids()
    t = 0.0
    out = []
    for i in range(n_requests):
        t += rng.expovariate(rate)
        hs = ids.take(rng.randint(*prompt_blocks))
        out.append(Request(0, t, len(hs) * block_tokens - rng.randrange(block_tokens),
                           rng.randint(*output_length), hs, session=i))
    return _finish(out)


def mix(n_requests: int = 2400, *, block_tokens: int = 512, seed: int = 0) -> list[Request]:
    """Chat, agents, RAG, sibling bursts and long single shots together, each at a share of its own rate.

    Each family keeps its own block ids (offset so they never collide) and its
    own arrival process; the union is sorted by arrival.  Sessions are
    renumbered per family so they stay distinct.
    """
    share = max(1, n_requests // 5)
    parts = [
        multi_turn_chat(max(1, share // 4), session_rate=1.0, block_tokens=block_tokens, seed=seed),
        agent_sessions(max(1, share // 15), session_rate=0.3, block_tokens=block_tokens, seed=seed + 1),
        rag_documents(share, rate=2.4, block_tokens=block_tokens, seed=seed + 2),
        sibling_bursts(max(1, share // 10), rate=0.75, block_tokens=block_tokens, seed=seed + 3),
        long_single_shot(share, rate=1.2, block_tokens=block_tokens, seed=seed + 4),
    ]
    out: list[Request] = []
    offset = 0
    for k, part in enumerate(parts):
        top = 0
        for r in part:
            out.append(replace(r, hash_ids=tuple(h + offset for h in r.hash_ids), session=r.session * 8 + k))
            top = max(top, max(r.hash_ids) + 1)
        offset += top
    return _finish(out)


#: Generator name -> function (used by ``--trace gen:NAME``).
GENERATORS: dict[str, Callable[..., list[Request]]] = {
    "shared_system_prompt": shared_system_prompt,
    "multi_turn_chat": multi_turn_chat,
    "agent_sessions": agent_sessions,
    "rag_documents": rag_documents,
    "sibling_bursts": sibling_bursts,
    "long_single_shot": long_single_shot,
    "mix": mix,
}


def from_spec(spec: str) -> list[Request]:
    """Build a workload from ``gen:NAME`` or ``gen:NAME:key=value,key=value`` (ints/floats; ranges as a-b)."""
    parts = spec.split(":", 2)
    if len(parts) < 2 or parts[0] != "gen" or parts[1] not in GENERATORS:
        raise TraceError(f"unknown workload {spec!r}; generators: {', '.join('gen:' + g for g in GENERATORS)}")
    kw: dict[str, object] = {}
    if len(parts) == 3 and parts[2]:
        for item in parts[2].split(","):
            if "=" not in item:
                raise TraceError(f"bad generator argument {item!r} (key=value)")
            k, v = item.split("=", 1)
            try:
                if "-" in v.strip("-"):
                    a, b = v.split("-", 1)
                    kw[k] = (int(a), int(b))
                elif "." in v or "e" in v:
                    kw[k] = float(v)
                else:
                    kw[k] = int(v)
            except ValueError:
                raise TraceError(f"bad generator value {item!r}") from None
    known = [n for n, p in inspect.signature(GENERATORS[parts[1]]).parameters.items()
             if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    unknown = sorted(set(kw) - set(known))
    if unknown:
        raise TraceError(f"unknown parameter{'s' if len(unknown) > 1 else ''} {', '.join(unknown)} for gen:{parts[1]}; "
                         f"it takes: {', '.join(known)}")
    try:
        reqs = GENERATORS[parts[1]](**kw)  # type: ignore[arg-type]
    except (TypeError, ValueError, ArithmeticError, IndexError) as exc:
        # unknown keyword, or a value the generator cannot use (empty range, zero rate, no prompts)
        raise TraceError(f"bad generator arguments for {parts[1]}: {exc}") from None
    if not reqs:
        raise TraceError(f"{spec!r} generates no requests")
    for r in reqs:  # what load_trace guarantees for a file, a generated workload must meet too
        if not r.hash_ids or r.input_length < 1 or r.output_length < 0 or not 0 <= r.arrival_s < math.inf:
            raise TraceError(f"{spec!r} gives an invalid request (no blocks, "
                             f"no prompt tokens or a bad arrival time): {r}")
    return reqs
