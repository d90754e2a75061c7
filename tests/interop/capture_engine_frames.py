"""Record the KV-event frames a real vLLM engine publishes, for the no-vllm test suite (a script).

usage (from the repository root, after .ci/setup_vllm):
    KVROUTE_VLLM_PYTHON=$(.ci/setup_vllm) python tests/interop/capture_engine_frames.py \
        tests/data/vllm_0_32_engine_frames.msgpack

Starts the CPU engine (tiny model, block 32, 8 GPU blocks so a few prompts evict),
sends a fixed, seeded sequence of prompts that share prefixes (then a prefix-cache
reset and one more prompt), and records each request's prompt, its
``num_cached_tokens`` and the seq of the last batch published after it.  The
frames themselves are fetched afterwards from the engine's replay endpoint
(``[b"", start_seq]`` -> every buffered batch), so none can be missed.  Output:
a msgpack map (bytes as bin) read by ``tests/test_vllm_golden_frames.py``.
"""

from __future__ import annotations

import random
import sys
from pathlib import Path

import msgpack
import zmq

sys.path.insert(0, str(Path(__file__).parent))

from engine_process import BS, EngineProcess, free_port, vllm_env_or_reason  # noqa: E402


def prompts(rng: random.Random) -> list:
    def toks(n: int) -> list[int]:
        return [rng.randrange(3, 259) for _ in range(n)]

    sys_a, sys_b = toks(2 * BS), toks(BS)
    qa = toks(20)
    seq = [sys_a + qa, sys_a + toks(40), sys_a + qa, sys_b + toks(33), toks(3 * BS), sys_b + toks(70),
           sys_a + qa, toks(100), sys_a + toks(BS), sys_a + toks(BS)]
    seq += [{"cmd": "reset"}, toks(40), sys_a + qa]
    return seq


def fetch_all(replay_endpoint: str, timeout_ms: int = 10000) -> list[list[bytes]]:
    ctx = zmq.Context.instance()
    d = ctx.socket(zmq.DEALER)
    d.setsockopt(zmq.LINGER, 0)
    d.connect(replay_endpoint)
    d.send_multipart([b"", (0).to_bytes(8, "big")])
    frames = []
    while True:
        if not d.poll(timeout_ms):
            raise TimeoutError("replay endpoint did not answer")
        msg = d.recv_multipart()
        if msg[-2] == b"\xff" * 8:
            break
        frames.append(msg[1:])  # [topic, seq, payload]
    d.close()
    return frames


def main(argv: list[str]) -> int:
    out = Path(argv[1] if len(argv) > 1 else "tests/data/vllm_0_32_engine_frames.msgpack")
    env = vllm_env_or_reason()
    if isinstance(env, str):
        print(env, file=sys.stderr)
        return 2
    py, model = env
    eng = EngineProcess(py, model, port=free_port(), replay_port=free_port(), num_gpu_blocks=8, max_model_len=224)
    reqs = []
    try:
        info = eng.wait_ready()
        for p in prompts(random.Random(7)):
            if isinstance(p, dict):
                r = eng.reset_prefix_cache()
                reqs.append({"cmd": "reset", "ok": r["reset"], "last_seq": r["last_seq"]})
                continue
            r = eng.generate(p)
            reqs.append({"prompt": p, "num_cached_tokens": r["num_cached_tokens"], "last_seq": r["last_seq"]})
        frames = fetch_all(eng.replay_endpoint)
    finally:
        eng.stop()
    assert [int.from_bytes(f[1], "big") for f in frames] == list(range(reqs[-1]["last_seq"] + 1))
    doc = {"format": 1, "source": f"vllm {info['vllm']} engine (CPU build), tests/interop/capture_engine_frames.py",
           "block_size": BS, "num_gpu_blocks": info["num_gpu_blocks"], "requests": reqs, "frames": frames}
    out.write_bytes(msgpack.packb(doc, use_bin_type=True))
    print(f"{len(reqs)} requests, {len(frames)} frames written to {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv))
