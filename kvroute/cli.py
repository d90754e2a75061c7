"""The ``kvroute`` command line: ``sim``, ``tune``, ``serve``, ``proxy`` and ``demo``.

Subcommands are loaded lazily from the package that owns them, so ``kvroute
--help`` stays fast and the CLI module imports nothing heavy.
"""
from __future__ import annotations

import importlib

import click

#: subcommand -> "module:attribute" of its click command.
LAZY_COMMANDS = {
    "sim": "kvroute.sim.cli:sim",
    "tune": "kvroute.sim.cli:tune",
    "serve": "kvroute.sidecar.cli:serve",
    "demo": "kvroute.demo:demo",
    "proxy": "kvroute.serving.cli:proxy",
}


class _LazyGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(set(super().list_commands(ctx)) | set(LAZY_COMMANDS))

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name in LAZY_COMMANDS:
            mod, attr = LAZY_COMMANDS[name].split(":")
            try:
                return getattr(importlib.import_module(mod), attr)
            except (ImportError, AttributeError) as exc:
                raise click.ClickException(f"'{name}' is not available in this build: {exc}") from exc
        return super().get_command(ctx, name)


def _version_message() -> str:
    """``kvroute, version X (backend: native|python)``: which implementation of the core runs."""
    from .kvindex.backend import BACKEND

    return f"%(prog)s, version %(version)s (backend: {BACKEND})"


@click.group(cls=_LazyGroup)
@click.version_option(package_name="kvroute", message=_version_message())
def main() -> None:
    """KV-cache-aware routing and prefix eviction for vLLM and SGLang fleets."""


if __name__ == "__main__":
    main()
