"""Tiny causal LMs and a byte-level BPE tokenizer built on the spot, offline, saved like real checkpoints.

The tests, the examples and the demo use these instead of downloading a model. The tokenizer is a byte-level BPE
trained on a small built-in corpus, with Qwen3's chat template (read from TRL's installed copy, so TRL recognises it
and parses tool calls) and its special tokens. Everything is saved with ``save_pretrained`` and meant to be loaded
back with ``AutoTokenizer`` / ``AutoModelForCausalLM.from_pretrained``, the way users load real models.
"""

from __future__ import annotations

import os
from pathlib import Path

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<tool_call>", "</tool_call>",
                  "<tool_response>", "</tool_response>", "<think>", "</think>")

_CORPUS = """\
The agent reads the task, plans the next step and calls a tool when it needs facts.
User: find the cheapest flight from Paris to Rome on Monday and book it for two people.
Assistant: I will search for flights first. Then I compare prices and book the cheapest one.
Tool result: three flights found, prices 120, 95 and 143 euros. The flight at 95 euros leaves at 9:40.
Assistant: The cheapest flight costs 95 euros. I book it for two passengers now.
The order was cancelled because the payment failed. Please check the card number and try again.
Move left, move right, move up, move down, stay. The goal is at position seven on the number line.
Observation: you are at position 3. The goal is at 7. You have 6 turns left.
The answer is 42. The final answer is correct. The answer is wrong, try another approach.
search(query="weather in Berlin") returned sunny, 21 degrees. get_order(order_id="W123") returned shipped.
def add(a, b): return a + b  # a small function that adds two numbers and returns the sum
{"name": "search", "arguments": {"query": "flights Paris Rome", "date": "2026-11-30"}}
Step 1: read the spreadsheet. Step 2: filter the rows. Step 3: count the even addresses. Done.
Orchestrator: please search the web for martial arts schools near the stock exchange and list them.
WebSurfer: I typed the query into the search bar and clicked the first result. The page shows a map.
0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20 100 1000 yes no ok error success failure
"""


def default_corpus() -> list[str]:
    """Lines the tokenizer is trained on: the built-in text, repeated with light variation."""
    lines = [ln for ln in _CORPUS.splitlines() if ln.strip()]
    return lines + [ln.lower() for ln in lines] + [ln.upper() for ln in lines[:4]]


def qwen3_chat_template() -> str:
    """Qwen3's chat template as TRL ships it (``trl/chat_templates/qwen3.jinja``)."""
    import trl

    return (Path(trl.__file__).parent / "chat_templates" / "qwen3.jinja").read_text(encoding="utf-8")


def build_tokenizer(save_dir: str | os.PathLike | None = None, *, vocab_size: int = 512,
                    corpus: list[str] | None = None, chat_template: str | None = "qwen3"):
    """Train a byte-level BPE tokenizer with Qwen2's pre-tokenizer and wrap it as a ``Qwen2Tokenizer``.

    Why Qwen2's class: ``AutoTokenizer`` in transformers 5 loads any tokenizer saved beside a ``qwen2`` config as
    ``Qwen2Tokenizer``, which rebuilds its own pre-tokenizer (one digit per token, NFC) from the vocabulary. A
    generic tokenizer trained with another pre-tokenizer then encodes differently once a model is saved next to
    it: the demo's reference was trained on one tokenization of its prompts and queried with another. Trained with
    the same pre-tokenizer and saved as ``Qwen2Tokenizer``, it encodes identically with or without a ``config.json``
    of either tiny architecture (``tests/test_tiny.py``).

    Args:
        save_dir: if given, the tokenizer is saved there (``save_pretrained``).
        vocab_size: BPE vocabulary size, special tokens included.
        corpus: training lines (default: :func:`default_corpus`).
        chat_template: ``"qwen3"`` (TRL's copy), a Jinja string, or ``None`` for no template.
    """
    import json

    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import Qwen2Tokenizer

    reference = Qwen2Tokenizer()._tokenizer  # Qwen2's normalizer, pre-tokenizer and decoder, empty vocabulary
    bpe = Tokenizer(models.BPE())
    bpe.normalizer, bpe.pre_tokenizer, bpe.decoder = reference.normalizer, reference.pre_tokenizer, reference.decoder
    bpe.train_from_iterator(corpus or default_corpus(), trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=1, special_tokens=list(SPECIAL_TOKENS), show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    trained = json.loads(bpe.to_str())["model"]
    tok = Qwen2Tokenizer(
        vocab=trained["vocab"], merges=[tuple(m) for m in trained["merges"]],
        bos_token="<|endoftext|>", eos_token="<|im_end|>", pad_token="<|endoftext|>", unk_token=None,
        additional_special_tokens=list(SPECIAL_TOKENS[1:2] + SPECIAL_TOKENS[3:]),
    )
    template = qwen3_chat_template() if chat_template == "qwen3" else chat_template
    if template is not None:
        tok.chat_template = template
    if save_dir is not None:
        tok.save_pretrained(str(save_dir))
    return tok


def build_model(tokenizer, save_dir: str | os.PathLike | None = None, *, arch: str = "qwen2", hidden_size: int = 64,
                num_layers: int = 2, seed: int = 0, tie_word_embeddings: bool = True, **config_kwargs):
    """A randomly initialised tiny causal LM sized to ``tokenizer`` (``arch``: ``"qwen2"`` or ``"llama"``)."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

    config_cls = {"qwen2": Qwen2Config, "llama": LlamaConfig}[arch]
    config = config_cls(
        vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
        tie_word_embeddings=tie_word_embeddings, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **config_kwargs,
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    if save_dir is not None:
        model.save_pretrained(str(save_dir))
        tokenizer.save_pretrained(str(save_dir))
    return model


def perturbed_copy(model, save_dir: str | os.PathLike | None = None, *, scale: float = 0.05, seed: int = 1):
    """A copy of ``model`` with Gaussian noise of relative size ``scale`` on every weight: a stand-in "policy"."""
    import torch

    clone = type(model)(model.config)
    clone.load_state_dict(model.state_dict())
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in clone.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * scale * (p.std() if p.numel() > 1 else 1.0))
    if save_dir is not None:
        clone.save_pretrained(str(save_dir))
    return clone
