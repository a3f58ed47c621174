"""A random Hugging Face checkpoint of a real model's shape, for `rlhf-jax plan` and benchmarks.

    python bench/make_checkpoint.py llama-3.2-1b /tmp/ckpt/llama-3.2-1b

Nothing is downloaded: the shapes below are those of the published ``config.json`` files, the
weights are transformers' random initialisation saved in bfloat16 (half the disk), and the
tokenizer is a byte-level BPE trained here on a few lines, padded to the vocabulary size (a
plan reads only the architecture; a stage reads the tokenizer). Llama-3.2-1B uses plain RoPE
here (its ``llama3`` RoPE scaling changes no shape and is not implemented by rlhf_jax).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import transformers as T
from tokenizers import Tokenizer, models, pre_tokenizers, trainers

# The published shapes (config.json of each model on the Hugging Face Hub).
SHAPES = {
    "gpt2": (T.GPT2Config, T.GPT2LMHeadModel, dict(
        n_layer=12, n_embd=768, n_head=12, vocab_size=50257, n_positions=1024)),
    "smollm2-360m": (T.LlamaConfig, T.LlamaForCausalLM, dict(
        num_hidden_layers=32, hidden_size=960, intermediate_size=2560, num_attention_heads=15,
        num_key_value_heads=5, vocab_size=49152, max_position_embeddings=8192,
        tie_word_embeddings=True, rope_theta=100000.0)),
    "qwen2.5-0.5b": (T.Qwen2Config, T.Qwen2ForCausalLM, dict(
        num_hidden_layers=24, hidden_size=896, intermediate_size=4864, num_attention_heads=14,
        num_key_value_heads=2, vocab_size=151936, max_position_embeddings=32768,
        tie_word_embeddings=True, rope_theta=1000000.0)),
    "llama-3.2-1b": (T.LlamaConfig, T.LlamaForCausalLM, dict(
        num_hidden_layers=16, hidden_size=2048, intermediate_size=8192, num_attention_heads=32,
        num_key_value_heads=8, vocab_size=128256, max_position_embeddings=131072,
        tie_word_embeddings=True, rope_theta=500000.0)),
}  # fmt: skip


def tokenizer(vocab_size: int) -> T.PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=min(vocab_size, 512), special_tokens=["<unk>", "<eos>", "<pad>"]
    )
    tok.train_from_iterator(["a random checkpoint of a real shape"] * 4, trainer)
    fast = T.PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<eos>", pad_token="<pad>", unk_token="<unk>"
    )
    return fast


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("shape", choices=sorted(SHAPES))
    p.add_argument("out", type=Path)
    args = p.parse_args()
    config_cls, model_cls, shape = SHAPES[args.shape]
    config = config_cls(**shape)
    if args.shape != "gpt2":
        config.rope_parameters = {"rope_type": "default", "rope_theta": shape["rope_theta"]}
    torch.manual_seed(0)
    model = model_cls(config).to(torch.bfloat16)
    model.save_pretrained(args.out)
    tokenizer(config.vocab_size).save_pretrained(args.out)
    n = sum(p.numel() for p in model.parameters())
    print(f"{args.shape}: {n / 1e6:.0f}M parameters -> {args.out}")


if __name__ == "__main__":
    main()
