"""The tiny tokenizer encodes the same in memory, saved alone, and saved beside either tiny architecture."""

import pytest
from transformers import AutoTokenizer

from progadv_trl.tiny import build_model, build_tokenizer

TEXT = ("<|im_start|>user\nYou are at 1. Goal 3. 4 turns left. Prices: 120, 95 and 143 euros.<|im_end|>\n"
        "<|im_start|>assistant\n<think>\n\n</think>\n\nmove right<|im_end|>")


@pytest.mark.parametrize("arch", [None, "qwen2", "llama"])
def test_saved_tokenizer_encodes_like_the_built_one(tmp_path, arch):
    built = build_tokenizer(tmp_path)
    if arch is not None:  # the config.json a model writes decides the class AutoTokenizer picks
        build_model(built, tmp_path, arch=arch)
    loaded = AutoTokenizer.from_pretrained(str(tmp_path))
    ids = built(TEXT, add_special_tokens=False)["input_ids"]
    assert loaded(TEXT, add_special_tokens=False)["input_ids"] == ids
    assert built.decode(ids) == TEXT
    assert ids.count(built.convert_tokens_to_ids("<|im_end|>")) == 2
    assert (loaded.eos_token_id, loaded.pad_token_id) == (built.eos_token_id, built.pad_token_id)
    chat = [{"role": "user", "content": "hi"}]
    assert loaded.apply_chat_template(chat, tokenize=False) == built.apply_chat_template(chat, tokenize=False)
