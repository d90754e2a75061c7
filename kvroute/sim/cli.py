"""``kvroute sim`` and ``kvroute tune``: click commands over :mod:`kvroute.sim`.

``sim`` runs every (routing, eviction) pair on one workload and prints a
comparison table (or ``--json``), writing CSV/JSON/PNG into ``--out``.
``tune`` searches one policy's parameters (see :mod:`kvroute.sim.tune`) and
writes a JSON configuration that ``sim --config FILE`` loads.
"""
from __future__ import annotations

import json
import sys
from typing import Any

import click

from ..kvindex.errors import KVRouteError


def _split(value: str, registry: dict[str, Any], what: str, extra: dict[str, Any] | None = None) -> list[str]:
    """Policy names from a comma-separated list; ``all`` is every name in ``registry`` (not ``extra``)."""
    names = [v.strip() for v in value.split(",") if v.strip()]
    if names == ["all"]:
        return list(registry)
    bad = [n for n in names if n not in registry and n not in (extra or {})]
    if bad:
        raise click.BadParameter(f"unknown {what} polic{'y' if len(bad) == 1 else 'ies'} {', '.join(bad)}; "
                                 f"registered: {', '.join(registry)} (or 'all')")
    if not names:
        raise click.BadParameter(f"name at least one {what} policy")
    return names


def _common(f: Any) -> Any:
    """Options shared by ``sim`` and ``tune`` (the workload and the cluster)."""
    opts = [
        click.option("--trace", default="conversation", show_default=True,
                     help="Mooncake JSONL path, a bundled name (conversation, synthetic) or gen:NAME[:k=v,...]."),
        click.option("--limit", type=click.IntRange(min=0), default=None, help="Use only the first N requests."),
        click.option("--workers", type=int, default=8, show_default=True, help="Workers in the cluster."),
        click.option("--gpu-blocks", type=int, default=None,
                     help="GPU KV blocks per worker [default: what fits next to the weights in the preset]."),
        click.option("--host-blocks", type=int, default=None,
                     help="Host KV blocks per worker (0: no host tier) [default: the preset's host memory]."),
        click.option("--rate-scale", type=float, default=1.0, show_default=True,
                     help="Multiply the trace's request rate (divide its timestamps)."),
        click.option("--preset", default="llama-3.1-8b-h100", show_default=True,
                     help="Cost preset: llama-3.1-8b-h100, llama-3.1-8b-h200, llama-3.1-70b-h100, llama-3.1-70b-h200."),
        click.option("--cost", "cost_overrides", multiple=True, metavar="KEY=VALUE",
                     help="Override a cost constant (repeatable), e.g. --cost prefill_mfu=0.4."),
        click.option("--block-tokens", type=int, default=None,
                     help="Tokens per trace block (hash id)  [default: the bundled trace's (agentic: 64), else 512]."),
        click.option("--max-blocks", type=click.IntRange(min=1), default=None, help="Cut every prompt to its first N blocks."),
        click.option("--prefill-workers", type=int, default=0, show_default=True,
                     help="Disaggregate: this many prefill workers, the rest decode (0: aggregated)."),
        click.option("--event-lag", type=float, default=0.0, show_default=True,
                     help="Seconds from the end of a prefill step to the router applying its KV events."),
        click.option("--load-report-period", type=click.FloatRange(min=0), default=0.0, show_default=True,
                     metavar="SECONDS", help="Workers' load reaches the router every SECONDS (a metrics scrape, "
                     "as kvroute proxy --scrape-interval); 0: after every change."),
        click.option("--chunked-prefill", type=int, default=0, show_default=True, metavar="TOKENS",
                     help="Chunked prefill with this token budget per step (vLLM's max_num_batched_tokens); 0: off."),
        click.option("--serial", is_flag=True, help="Serve requests one at a time (ignore timestamps)."),
        click.option("--vllm-last-block", is_flag=True, help="Count a fully cached prompt one block short, as vLLM does."),
        click.option("--gpu-admission", is_flag=True,
                     help="Let the eviction policy refuse blocks on the GPU tier (an engine's GPU pool cannot: off by "
                          "default, the policy then only orders GPU evictions; host-tier admission always applies)."),
        click.option("--seed", type=int, default=0, show_default=True, help="Seed of the router's tie-breaking."),
        click.option("--router-replicas", type=click.IntRange(min=1), default=1, show_default=True,
                     help="Active-active router replicas; requests are spread over them round robin."),
        click.option("--replica-sync", type=click.Choice(["none", "shared"]), default="shared", show_default=True,
                     help="What replicas share: none (each knows its own decisions) or shared (kvroute.sync)."),
        click.option("--sync-delay", type=float, default=0.0, show_default=True, metavar="SECONDS",
                     help="Seconds from a replica's decision to the other replicas applying it."),
        click.option("--approximate", is_flag=True,
                     help="Approximate mode: routers get no KV events and predict caches from their decisions."),
        click.option("--approx-ttl", type=float, default=600.0, show_default=True, metavar="SECONDS",
                     help="Lifetime of an approximate-mode entry."),
        click.option("--config", "configs", multiple=True, type=click.Path(exists=True, dir_okay=False),
                     help="A tuned configuration written by `kvroute tune` (repeatable)."),
    ]
    for o in reversed(opts):
        f = o(f)
    return f


def _block_tokens(o: dict[str, Any]) -> int:
    """``--block-tokens``, else the bundled trace's own block size, else Mooncake's 512."""
    from ..traces import BUNDLED_BLOCK_TOKENS, MOONCAKE_BLOCK_TOKENS

    if o["block_tokens"] is None:
        o["block_tokens"] = BUNDLED_BLOCK_TOKENS.get(o["trace"], MOONCAKE_BLOCK_TOKENS)
    return o["block_tokens"]


def _base_config(o: dict[str, Any]) -> Any:
    from .cost import get_preset, parse_overrides
    from .engine import SimConfig

    _block_tokens(o)
    cost = get_preset(o["preset"])
    if o["cost_overrides"]:
        cost = cost.with_overrides(parse_overrides(o["cost_overrides"]))
    return SimConfig(
        workers=o["workers"], gpu_blocks=o["gpu_blocks"], host_blocks=o["host_blocks"],
        block_tokens=o["block_tokens"], rate_scale=o["rate_scale"], cost=cost, serial=o["serial"],
        vllm_last_block=o["vllm_last_block"], prefill_workers=o["prefill_workers"], seed=o["seed"],
        event_lag_s=o["event_lag"], load_report_period_s=o["load_report_period"], chunked_prefill_tokens=o["chunked_prefill"], gpu_admission=o["gpu_admission"],
        router_replicas=o["router_replicas"], replica_sync=o["replica_sync"], sync_delay_s=o["sync_delay"],
        approximate=o["approximate"], approx_ttl_s=o["approx_ttl"],
    )


def _workload(o: dict[str, Any]) -> list[Any]:
    from ..traces import load_trace, reshape
    from .workloads import from_spec

    t = o["trace"]
    _block_tokens(o)
    reqs = from_spec(t) if t.startswith("gen:") else load_trace(t, limit=o["limit"])
    if t.startswith("gen:") and o["limit"]:
        reqs = reqs[: o["limit"]]
    if o["max_blocks"]:
        reqs = reshape(reqs, block_tokens=o["block_tokens"], max_blocks=o["max_blocks"])
    return reqs


class _SharedBar:
    """One tqdm bar over all the runs of a command; each run relabels it (``close`` is a no-op)."""

    def __init__(self, total: int, enabled: bool) -> None:
        self.bar = None
        if enabled:
            from tqdm import tqdm

            self.bar = tqdm(total=total, unit="req", leave=False, file=sys.stderr, mininterval=0.5)

    def __call__(self, total: int, desc: str) -> Any:
        if self.bar is None:
            return None
        self.bar.set_description(desc, refresh=False)
        return self

    def update(self, n: int) -> None:
        self.bar.update(n)  # type: ignore[union-attr]

    def close(self) -> None:
        pass

    def done(self) -> None:
        if self.bar is not None:
            self.bar.close()


#: Default policies of ``kvroute sim`` (those not registered in this build are left out).
DEFAULT_ROUTING = "kvroute,dynamo,round_robin"
DEFAULT_EVICTION = "lru"


@click.command()
@_common
@click.option("--routing", default=DEFAULT_ROUTING, show_default=True,
              help="Comma-separated routing policies, or 'all'.")
@click.option("--eviction", default=None,
              help=f"Comma-separated eviction policies, or 'all'  [default: {DEFAULT_EVICTION}].")
@click.option("--out", "out_dir", type=click.Path(file_okay=False), default=None,
              help="Write results.csv, results.json and PNG plots here.")
@click.option("--sweep", default="0.25,0.5,1,2", show_default=True,
              help="With --out: capacity factors (GPU and host tiers scaled alike) for the hit-ratio-vs-capacity "
                   "plot, run with the first routing policy ('' to skip).")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON (nothing else on stdout).")
@click.option("--no-progress", is_flag=True, help="No progress bar.")
def sim(routing: str, eviction: str | None, out_dir: str | None, sweep: str, as_json: bool, no_progress: bool,
        **o: Any) -> None:
    """Replay a trace through a simulated cluster running kvroute's real router and caches."""
    from ..eviction import POLICIES as EVICTION
    from ..router import POLICIES as ROUTING
    from ..router.policies import VARIANTS
    from .runner import run_matrix, sweep_capacity
    from .tune import load_configs

    try:
        routes = _split(routing, ROUTING, "routing", VARIANTS)
        if eviction is None:
            eviction = ",".join(e for e in DEFAULT_EVICTION.split(",") if e in EVICTION)
        evicts = _split(eviction, EVICTION, "eviction")
        if eviction.strip() == "all" and (o["prefill_workers"] or o["workers"]) > 1:
            from .engine import ORACLES

            skipped = [e for e in evicts if e in ORACLES]
            evicts = [e for e in evicts if e not in ORACLES]
            if skipped and not as_json:
                click.echo(f"note: {', '.join(skipped)} needs one cache's future: run it with --workers 1", err=True)
        base = _base_config(o)
        tuned = load_configs(o["configs"])
        reqs = _workload(o)
        base.validate()
        try:
            factors = [float(x) for x in sweep.split(",") if x.strip()] if out_dir else []
        except ValueError:
            raise click.BadParameter(f"not a list of numbers: {sweep!r}", param_hint="--sweep") from None
        if not all(0 < f < float("inf") for f in factors):  # also refuses nan
            raise click.BadParameter("capacity factors must be finite numbers > 0", param_hint="--sweep")
        runs = len(routes) * len(evicts) + len(factors) * len(evicts)
        bar = _SharedBar(runs * len(reqs), not no_progress)
        try:
            results, ttfts = run_matrix(reqs, base, routes, evicts, tuned=tuned, progress=bar)
            curve = None
            if factors:
                curve = sweep_capacity(reqs, base, routes[0], evicts, factors, tuned=tuned, progress=bar)
        finally:
            bar.done()
    except KVRouteError as exc:
        raise click.ClickException(str(exc)) from exc
    if out_dir:
        from .report import write_outputs

        meta = {"trace": o["trace"], "requests": len(reqs), "workers": base.workers, "preset": base.cost.name,
                "rate_scale": base.rate_scale, "gpu_blocks": base.resolved_gpu_blocks(),
                "host_blocks": base.resolved_host_blocks(), "prefill_workers": base.prefill_workers}
        title = f"({o['trace']}, {base.workers} workers, x{base.rate_scale:g})"
        paths = write_outputs(out_dir, results, ttfts, curve, title=title, meta=meta)
        if not as_json:
            click.echo("wrote " + ", ".join(paths), err=True)
    if as_json:
        from .report import json_doc

        click.echo(json.dumps(json_doc(results)))
        return
    from .report import table

    click.echo(f"{o['trace']}: {len(reqs)} requests, {base.workers} workers ({base.cost.name}), "
               f"{base.resolved_gpu_blocks()} GPU + {base.resolved_host_blocks()} host blocks of "
               f"{base.block_tokens} tokens per worker, rate x{base.rate_scale:g}"
               + (f", {base.prefill_workers} prefill + {base.workers - base.prefill_workers} decode workers"
                  if base.prefill_workers else ""))
    click.echo(table(results))


@click.command()
@_common
@click.option("--policy", required=True, help="A routing policy (router weights) or an eviction policy (its parameters).")
@click.option("--routing", "fixed_routing", default="kvroute", show_default=True,
              help="Routing policy used while tuning an eviction policy.")
@click.option("--eviction", "fixed_eviction", default="lru", show_default=True,
              help="Eviction policy used while tuning a routing policy.")
@click.option("--objective", default="ttft_mean_s", show_default=True,
              help="Summary field to minimise (ttft_mean_s, ttft_p99_s, e2e_mean_s) or maximise (*hit_ratio, throughput_tok_s).")
@click.option("--budget", type=int, default=24, show_default=True, help="Simulations to spend on the search.")
@click.option("--output", "-o", "output", type=click.Path(dir_okay=False), default=None,
              help="Where to write the best configuration [default: tuned-<policy>.json].")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def tune(policy: str, fixed_routing: str, fixed_eviction: str, objective: str, budget: int, output: str | None,
         as_json: bool, **o: Any) -> None:
    """Search a policy's parameters on a trace; write the best configuration for `kvroute sim --config`."""
    from .tune import tune_policy

    try:
        base = _base_config(o)
        reqs = _workload(o)
        base.validate()
        res = tune_policy(reqs, base, policy, objective=objective, budget=budget, routing=fixed_routing,
                          eviction=fixed_eviction, trace=o["trace"],
                          log=None if as_json else (lambda m: click.echo(m, err=True)))
    except KVRouteError as exc:
        raise click.ClickException(str(exc)) from exc
    path = output or f"tuned-{policy}.json"
    with open(path, "w", encoding="utf-8") as f:
        json.dump(res, f, indent=1)
    if as_json:
        click.echo(json.dumps(res))
    else:
        click.echo(f"best {objective} = {res['score']:.4g} (defaults {res['default_score']:.4g}) changing "
                   f"{json.dumps(res['changed']) if res['changed'] else 'nothing'}; wrote {path}")
