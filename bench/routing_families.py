"""Routing across workload families: the 8 policies on every family at several loads, side by side.

Runs ``kvroute sim`` (the real router and caches; simulated time) for each
family and load and writes one JSON per cell, then the tables of
``docs/results.md`` ("Routing across workload families").  Serial (one
simulation at a time) so it can run beside other work: ``nice -n 10``.

    python bench/routing_families.py run --out out/families            # all cells (skips cells already done)
    python bench/routing_families.py table --out out/families          # markdown tables + margins

Families (``kvroute/sim/workloads.py`` documents the generators):
conversation (bundled Mooncake chat trace), agentic (bundled agentic coding
trace, 64-token blocks, first ``--agentic-limit`` requests), rag
(``gen:rag_documents``), siblings (``gen:sibling_bursts``), long
(``gen:long_single_shot``), mix (``gen:mix``).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

FAMILIES = {
    "conversation": ["--trace", "conversation"],
    "agentic": ["--trace", "agentic"],
    "rag": ["--trace", "gen:rag_documents"],
    "siblings": ["--trace", "gen:sibling_bursts"],
    "long": ["--trace", "gen:long_single_shot"],
    "mix": ["--trace", "gen:mix"],
}
LOADS = ["0.5", "1", "2", "3"]
PEERS = ["dynamo", "sglang", "llmd", "preble"]
ORDER = ["kvroute", "dynamo", "sglang", "llmd", "preble", "round_robin", "least_loaded", "power_of_two"]


def _cell(out: str, fam: str, load: str) -> str:
    return os.path.join(out, f"{fam}-x{load}.json")


def run(args: argparse.Namespace) -> None:
    os.makedirs(args.out, exist_ok=True)
    fams = args.families.split(",") if args.families else list(FAMILIES)
    loads = args.loads.split(",") if args.loads else LOADS
    for fam in fams:
        for load in loads:
            path = _cell(args.out, fam, load)
            if os.path.exists(path) and not args.force:
                continue
            cmd = [sys.executable, "-m", "kvroute.cli", "sim", *FAMILIES[fam], "--routing", args.routing,
                   "--eviction", "lru", "--rate-scale", load, "--json", "--no-progress"]
            if fam == "agentic":
                cmd += ["--limit", str(args.agentic_limit)]
            cmd += args.extra
            t0 = time.time()
            res = subprocess.run(cmd, capture_output=True, text=True)
            if res.returncode:
                print(f"{fam} x{load}: failed\n{res.stderr[-2000:]}", file=sys.stderr)
                continue
            doc = json.loads(res.stdout)
            doc["command"] = "kvroute sim " + " ".join(cmd[4:])
            with open(path + ".tmp", "w") as f:
                json.dump(doc, f)
            os.replace(path + ".tmp", path)
            print(f"{fam} x{load}: {time.time() - t0:.0f} s", flush=True)


def _fmt(v: float) -> str:
    return f"{v:.3f}" if v < 10 else f"{v:.1f}"


def table(args: argparse.Namespace) -> None:
    fams = args.families.split(",") if args.families else list(FAMILIES)
    loads = args.loads.split(",") if args.loads else LOADS
    summary = []
    for fam in fams:
        cells = {}
        for load in loads:
            p = _cell(args.out, fam, load)
            if os.path.exists(p):
                with open(p) as f:
                    cells[load] = {r["routing"]: r for r in json.load(f)["results"]}
        if not cells:
            continue
        print(f"\n**{fam}** (TTFT mean / p99 in s; best of each column in bold)\n")
        hdr = "| policy | " + " | ".join(f"x{ld} mean | x{ld} p99" for ld in cells) + " |"
        print(hdr)
        print("|---|" + "---:|" * (2 * len(cells)))
        best = {ld: (min(r["ttft_mean_s"] for r in c.values()), min(r["ttft_p99_s"] for r in c.values()))
                for ld, c in cells.items()}
        for pol in ORDER:
            row = [pol]
            for ld, c in cells.items():
                r = c.get(pol)
                if r is None:
                    row += ["-", "-"]
                    continue
                m, p = r["ttft_mean_s"], r["ttft_p99_s"]
                row.append(f"**{_fmt(m)}**" if m == best[ld][0] else _fmt(m))
                row.append(f"**{_fmt(p)}**" if p == best[ld][1] else _fmt(p))
            print("| " + " | ".join(row) + " |")
        for ld, c in cells.items():
            if "kvroute" not in c:
                continue
            k = c["kvroute"]
            peers = [c[p] for p in PEERS if p in c]
            bm = min(peers, key=lambda r: r["ttft_mean_s"])
            bp = min(peers, key=lambda r: r["ttft_p99_s"])
            mean_ok = k["ttft_mean_s"] <= bm["ttft_mean_s"]
            p99_ok = k["ttft_p99_s"] <= 1.05 * bp["ttft_p99_s"]
            summary.append((fam, ld, k["ttft_mean_s"], bm["routing"], bm["ttft_mean_s"], k["ttft_p99_s"],
                            bp["routing"], bp["ttft_p99_s"], mean_ok, p99_ok))
    print("\n**Targets** (kvroute mean <= every corrected peer's; p99 <= 1.05x the best peer's)\n")
    print("| family | load | kvroute mean | best peer mean | margin | kvroute p99 | best peer p99 | ratio | mean | p99 |")
    print("|---|---|---:|---|---:|---:|---|---:|---|---|")
    for fam, ld, km, bmn, bmv, kp, bpn, bpv, mok, pok in summary:
        print(f"| {fam} | x{ld} | {_fmt(km)} | {bmn} {_fmt(bmv)} | {100 * (km / bmv - 1):+.1f}% | {_fmt(kp)} | "
              f"{bpn} {_fmt(bpv)} | {kp / bpv:.3f} | {'met' if mok else 'MISSED'} | {'met' if pok else 'MISSED'} |")
    met = sum(1 for s in summary if s[8] and s[9])
    print(f"\n{met} of {len(summary)} cells meet both targets.")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=["run", "table"])
    ap.add_argument("--out", default="out/families")
    ap.add_argument("--families", default="", help="comma-separated subset of " + ",".join(FAMILIES))
    ap.add_argument("--loads", default="", help="comma-separated rate scales (default 0.5,1,2,3)")
    ap.add_argument("--routing", default="all")
    ap.add_argument("--agentic-limit", type=int, default=600)
    ap.add_argument("--force", action="store_true", help="rerun cells that already have results")
    ap.add_argument("extra", nargs="*", help="more kvroute sim options (after --)")
    args = ap.parse_args()
    (run if args.what == "run" else table)(args)


if __name__ == "__main__":
    main()
