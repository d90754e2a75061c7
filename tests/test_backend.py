"""Backend selection: KVROUTE_PURE_PYTHON, a core that fails to import, and who reports which backend runs."""
from __future__ import annotations

import os
import subprocess
import sys

from click.testing import CliRunner

from kvroute.cli import main
from kvroute.kvindex import KVIndex
from kvroute.kvindex.backend import BACKEND
from kvroute.router import Router
from kvroute.sidecar.service import health

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _probe(code: str, **env: str) -> subprocess.CompletedProcess:
    e = {k: v for k, v in os.environ.items() if k != "KVROUTE_PURE_PYTHON"}
    e.update(env)
    e["PYTHONPATH"] = ROOT + os.pathsep + e.get("PYTHONPATH", "")
    return subprocess.run([sys.executable, "-W", "always", "-c", code], capture_output=True, text=True, env=e, timeout=120)


def test_version_and_health_name_the_backend():
    out = CliRunner().invoke(main, ["--version"])
    assert out.exit_code == 0 and f"(backend: {BACKEND})" in out.output
    r = Router(["a"], 4)
    assert KVIndex.backend == BACKEND == r.index.backend
    assert health(r, None)["backend"] == BACKEND


def test_pure_python_env_selects_the_reference_without_warning():
    p = _probe("import kvroute.kvindex as k; print(k.BACKEND, k.KVIndex.__module__)", KVROUTE_PURE_PYTHON="1")
    assert p.returncode == 0, p.stderr
    assert p.stdout.split() == ["python", "kvroute.kvindex.index"]
    assert "Warning" not in p.stderr


def test_core_that_fails_to_import_warns_once_and_falls_back():
    code = ("import sys; sys.modules['kvroute.kvindex._kvcore'] = None\n"
            "import kvroute, kvroute.kvindex as k, kvroute.router\n"
            "r = kvroute.router.Router(['a'], 2); d = r.route([1, 2, 3, 4], request_id=1)\n"
            "print(k.BACKEND, d.worker)")
    p = _probe(code)
    assert p.returncode == 0, p.stderr
    assert p.stdout.split() == ["python", "a"]
    assert p.stderr.count("RuntimeWarning") == 1 and "compiled core failed to import" in p.stderr
