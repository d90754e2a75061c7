"""The GPU eviction plugin refuses loudly inside real vLLM (interop venv).

* an engine started with ``KVROUTE_VLLM_GPU_EVICTION`` naming no kvroute policy
  does not start: vLLM calls the plugin's ``register`` through the
  ``vllm.general_plugins`` entry point and the error aborts the start;
* on a vLLM release outside ``SUPPORTED_VLLM`` (simulated by changing
  ``vllm.__version__`` before install) both adapters refuse to load.
"""

from __future__ import annotations

import subprocess

import pytest

from engine_process import EngineError, free_port

pytestmark = [pytest.mark.vllm]


def test_engine_refuses_an_unknown_policy(start_engine) -> None:
    eng = start_engine(port=free_port(), replay_port=free_port(), num_gpu_blocks=8, max_model_len=224,
                       extra_env={"KVROUTE_VLLM_GPU_EVICTION": "no-such-policy"})
    with pytest.raises(EngineError) as info:
        eng.wait_ready()
    assert "UnsupportedVLLMError" in str(info.value) and "no-such-policy" in str(info.value)


def test_other_vllm_versions_are_refused(vllm_env) -> None:
    py, _ = vllm_env
    code = (
        "import vllm; vllm.__version__ = '0.99.0'\n"
        "from kvroute.adapters.vllm_plugin import install, UnsupportedVLLMError\n"
        "try:\n    install('lru')\nexcept UnsupportedVLLMError as e:\n    print('plugin refused:', e)\n"
        "try:\n    import kvroute.adapters.vllm_cache_policy\nexcept UnsupportedVLLMError as e:\n"
        "    print('cache policy refused:', e)\n"
    )
    out = subprocess.run([py, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "plugin refused:" in out.stdout and "0.99.0" in out.stdout
    assert "cache policy refused:" in out.stdout
