"""Tokenizers: every one finished the same way, and the tiny model's, trained in-process.

`finish_tokenizer` gives any tokenizer a pad token distinct from EOS where the vocabulary allows it, EOS set to
the chat turn's end (`<|im_end|>` for ChatML models) and a chat template. `tiny_tokenizer` is a byte-level BPE
trained on a fixed corpus of LaMP-style text (the task templates, synthetic users' text, the tags), so
`load_tokenizer("tiny")` gives every caller the same tokenizer without a download.
"""

from __future__ import annotations

import functools

from tokenizers import Tokenizer, decoders, pre_tokenizers, trainers
from tokenizers import models as tokenizer_models
from transformers import PreTrainedTokenizerFast

from . import lamp, synthetic
from .tags import DEFAULT_TAGS

CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def finish_tokenizer(tok):
    """Pad distinct from EOS when the vocabulary allows, EOS = end of chat turn, a chat template."""
    vocab = tok.get_vocab()
    if "<|im_end|>" in vocab:
        tok.eos_token = "<|im_end|>"
    if tok.pad_token is None or tok.pad_token_id == tok.eos_token_id:
        for cand in ("<|endoftext|>", "<|pad|>", "<pad>"):
            if cand in vocab and vocab[cand] != tok.eos_token_id:
                tok.pad_token = cand
                break
        else:
            tok.pad_token = tok.eos_token  # we mask with attention masks, never by pad id
    if not getattr(tok, "chat_template", None):
        tok.chat_template = CHATML_TEMPLATE
    tok.padding_side = "right"
    return tok


def _tiny_corpus() -> list[str]:
    """Fixed LaMP-style training text for the tiny tokenizer (no randomness outside the seed). The synthetic
    users' vocabulary is read here rather than passed in: `load_tokenizer("tiny")` must give every caller the
    same tokenizer, and `synthetic` imports no model code, so this import makes no loop."""

    texts = [t.template for t in lamp.TASKS.values()] + [t.phrase for t in lamp.TASKS.values()]
    texts += list(synthetic.vocabulary_text())
    steps = " ".join(f"<{t}> ... </{t}>" for t in DEFAULT_TAGS)
    texts += [f"<think> {steps} </think> answer"] * 50
    texts += ["Following the given patterns", "are written by a person", "Just answer with", "is the title for"] * 20
    return texts


@functools.lru_cache(maxsize=4)
def _tiny_tokenizer_json(vocab_size: int) -> str:
    tok = Tokenizer(tokenizer_models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        show_progress=False,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(_tiny_corpus(), trainer=trainer)
    return tok.to_str()


def tiny_tokenizer(vocab_size: int = 2048):
    tok = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_tiny_tokenizer_json(vocab_size)),
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token=None,
        model_max_length=8192,
    )
    tok.chat_template = CHATML_TEMPLATE
    return finish_tokenizer(tok)


# ----------------------------------------------------------------------------- models
