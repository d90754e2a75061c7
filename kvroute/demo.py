"""``kvroute demo``: hash prompts and match them against an index (no engine needed)."""
from __future__ import annotations

import random

import click

from .kvindex import KVIndex, block_hash_list


@click.command()
@click.option("--workers", default=4, show_default=True, help="Number of simulated workers.")
@click.option("--block-size", default=16, show_default=True)
@click.option("--seed", default=0, show_default=True)
def demo(workers: int, block_size: int, seed: int) -> None:
    """Store shared-prefix prompts on a few workers and show what a new prompt matches."""
    rng = random.Random(seed)
    system = [rng.randrange(32000) for _ in range(4 * block_size)]
    index = KVIndex(block_size)
    for w in range(workers):
        for _ in range(3):
            prompt = system + [rng.randrange(32000) for _ in range(rng.randrange(1, 6) * block_size)]
            index.store(f"worker-{w}", block_hash_list(prompt, block_size))
    probe = system + [rng.randrange(32000) for _ in range(2 * block_size)]
    click.echo(f"prompt of {len(probe)} tokens = {len(probe) // block_size} blocks of {block_size}")
    for wid, ov in sorted(index.match_tokens(probe).items(), key=lambda kv: str(kv[0])):
        click.echo(f"  {wid}: {ov.total} blocks cached (gpu {ov.gpu}, host {ov.host}, disk {ov.disk})")
    click.echo(f"index: {index.stats()}")
