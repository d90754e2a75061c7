"""``kvroute proxy`` command line: help, and clear errors for bad engine specs."""
from __future__ import annotations

import pytest
from click.testing import CliRunner

from kvroute.cli import main
from kvroute.serving.engines import EngineSpec


def test_help_lists_options() -> None:
    out = CliRunner().invoke(main, ["proxy", "--help"])
    assert out.exit_code == 0
    for opt in ("--engine", "--block-size", "--policy", "--scrape-interval", "--fail-threshold", "--tokenizer"):
        assert opt in out.output


@pytest.mark.parametrize("spec", ["e0", "e0=", "=http://h:1", "e0=ftp://h:1", "e0=http://h:99999",
                                  "e0=http://h:1,udp://h:2", "e0=http://h:1,tcp://a:1,tcp://a:2,tcp://a:3"])
def test_bad_engine_specs_are_usage_errors(spec: str) -> None:
    out = CliRunner().invoke(main, ["proxy", "--engine", spec])
    assert out.exit_code == 2 and "--engine" in out.output


def test_engine_spec_forms() -> None:
    assert EngineSpec.parse("e0=http://h:8000/v1/") == EngineSpec("e0", "http://h:8000")
    s = EngineSpec.parse("e1=http://h:8000,tcp://h:5557,tcp://h:5558")
    assert (s.events, s.replay) == ("tcp://h:5557", "tcp://h:5558")
