"""Token ids of an episode under the tokenizer's chat template, piece by piece.

An episode's ids are ``prompt + reply_1 + obs_1 + reply_2 + obs_2 + ...`` where

* ``prompt``: system and first user message plus the generation header (``...<|im_start|>assistant\\n``);
* ``reply``: the reply text's tokens plus the end-of-turn token: exactly what the policy samples;
* ``obs``: everything the template writes between a reply's end-of-turn token and the next reply
  (``\\n<|im_start|>user\\n<obs><|im_end|>\\n<|im_start|>assistant\\n``; without the header after the last one).

Each piece is tokenized on its own, as :class:`progadv_trl.rendering.TrajectoryTokenizer` does, so the ids the
policy was trained on, the ids the scorer reads and the ids the exact DP queried are the same.
"""

from __future__ import annotations

from functools import lru_cache

_PROBE = "\x00probe\x00"


class ChatCodec:
    """Token ids for the pieces of a built-in task's episodes (:mod:`~progadv_trl.envs.tasks`)."""

    def __init__(self, tokenizer, env):
        self.tokenizer, self.env = tokenizer, env
        self.eos_id = tokenizer.convert_tokens_to_ids(tokenizer.eos_token)
        self.reply_ids = [self.encode(r + tokenizer.eos_token) for r in env.replies]
        self._reply_by_ids = {tuple(ids): i for i, ids in enumerate(self.reply_ids)}
        self.max_reply_tokens = max(len(ids) for ids in self.reply_ids)
        self.prompt_ids = lru_cache(maxsize=None)(self._prompt_ids)
        self.observation_ids = lru_cache(maxsize=None)(self._observation_ids)

    def encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def _render(self, messages, generation_prompt: bool) -> str:
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)

    def _prompt_ids(self, task) -> tuple[int, ...]:
        return tuple(self.encode(self._render(self.env.prompt(task), True)))

    def _observation_ids(self, text: str, final: bool) -> tuple[int, ...]:
        msgs = [{"role": "system", "content": "s"}, {"role": "user", "content": "u"},
                {"role": "assistant", "content": _PROBE}, {"role": "user", "content": text}]
        full = self._render(msgs, not final)
        anchor = _PROBE + self.tokenizer.eos_token
        return tuple(self.encode(full[full.index(anchor) + len(anchor):]))

    def reply_index(self, ids) -> int | None:
        """The valid reply whose canonical ids (end-of-turn included) are exactly ``ids``, else ``None``.

        A valid string sampled through a non-canonical tokenization counts as invalid: that keeps the DP's
        ``P_ref(reply | history)`` (canonical ids only) exact for the episodes the policy really produces.
        """
        return self._reply_by_ids.get(tuple(ids))

    def history_ids(self, task, history) -> list[int]:
        """Ids before the next reply; ``history`` is ``((reply_index, observation), ...)`` of a non-final prefix
        (an observation is ``env.observe(next_state)``: the number line's whole state, the repair task's reading)."""
        ids = list(self.prompt_ids(task))
        for reply, obs in history:
            ids += self.reply_ids[reply]
            ids += self.observation_ids(self.env.observation(task, obs), False)
        return ids
