"""The InstructLang tokenizer as a HF tokenizer directory, loaded like any real model's tokenizer.

A word-level `tokenizers` model (WhitespaceSplit pre-tokenizer, one id per token name, ids as in
`lang.TOKENS`) wrapped in `transformers.PreTrainedTokenizerFast`, so the pipeline reads it
through `transformers.AutoTokenizer.from_pretrained(directory)`, the path real models take.

The vocabulary has no unknown token, so none is declared: encoding a word outside the vocabulary
raises an error instead of silently mapping it to some id. Padding is on the left, as for prompts.
No post-processor adds BOS/EOS: prompts carry their own, so ``add_special_tokens`` changes nothing.
"""

import os

from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from rlhf_jax.instructlang import lang


def build_tokenizer() -> PreTrainedTokenizerFast:
    """The InstructLang tokenizer in memory."""
    # WordLevel needs an unk name; it is not in the vocabulary, so unknown words fail loudly.
    model = models.WordLevel(dict(lang.TOKEN_TO_ID), unk_token="<unk>")
    tokenizer = Tokenizer(model)
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        pad_token="<pad>",
        bos_token="<bos>",
        eos_token="<eos>",
        sep_token="<sep>",
        padding_side="left",
    )


def save_tokenizer(directory: str | os.PathLike) -> str:
    """Writes the tokenizer directory (tokenizer.json, tokenizer_config.json); returns its path."""
    directory = os.fspath(directory)
    build_tokenizer().save_pretrained(directory)
    return directory
