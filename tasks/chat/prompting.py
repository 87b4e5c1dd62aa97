"""From a conversation's history to prompt token ids: the tokenizer's chat template, trimmed to the context window.

User text is data, never markup. When a message contains a string that the tokenizer would read as a control token
(``</s>``, ``<|user|>``, ``<|im_start|>``...), the prompt is tokenized piece by piece: the template's own text with
special tokens recognised, every message's content with ``split_special_tokens=True``, so the typed ``</s>`` becomes
ordinary sub-word pieces. Otherwise the whole rendered prompt is tokenized in one go, exactly like training did.
"""

from __future__ import annotations

import re
import secrets

from tasks.ml.generation import with_bos


class PromptTooLong(ValueError):
    pass


def _control_strings(tokenizer) -> list[str]:
    names = set(tokenizer.all_special_tokens)
    names.update(t.content if hasattr(t, "content") else str(t) for t in tokenizer.added_tokens_decoder.values())
    return sorted((n for n in names if n), key=len, reverse=True)


def contains_control(tokenizer, text: str) -> bool:
    return any(c in text for c in _control_strings(tokenizer))


def encode_conversation(tokenizer, messages: list[dict]) -> list[int]:
    """Prompt ids for messages (ending with a user turn), ready for the assistant's answer."""
    msgs = [{"role": m["role"], "content": m["content"].strip()} for m in messages]
    if not any(contains_control(tokenizer, m["content"]) for m in msgs):
        text = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        return with_bos(tokenizer, tokenizer(text, add_special_tokens=False)["input_ids"])
    nonce = secrets.token_hex(8)
    marks = [f"\ue000{nonce}{i}\ue001" for i in range(len(msgs))]
    text = tokenizer.apply_chat_template([{**m, "content": mark} for m, mark in zip(msgs, marks, strict=True)],
                                         tokenize=False, add_generation_prompt=True)
    ids: list[int] = []
    for piece in re.split(f"(\ue000{nonce}\\d+\ue001)", text):
        if not piece:
            continue
        if piece in marks:
            content = msgs[marks.index(piece)]["content"]
            ids += tokenizer(content, add_special_tokens=False, split_special_tokens=True)["input_ids"]
        else:
            ids += tokenizer(piece, add_special_tokens=False)["input_ids"]
    return with_bos(tokenizer, ids)


def build_prompt(tokenizer, system_prompt: str, history: list[dict], budget: int) -> tuple[list[int], int]:
    """(prompt ids, turns dropped): the system prompt, then as many of the latest turns as fit in ``budget`` tokens.

    History is oldest first and ends with the new user message. Whole user/assistant exchanges are dropped from the
    oldest end, so the prompt never starts with a dangling assistant answer. The cut is searched (``_first_fitting``),
    not walked one exchange at a time: O(log n) tokenizations of a long conversation instead of O(n), each of the
    whole remaining conversation.
    """
    system = [{"role": "system", "content": system_prompt}] if system_prompt else []
    starts = cut_points(history)
    encoded: dict[int, list[int]] = {}

    def ids(i: int) -> list[int]:  # the prompt from candidate cut i on, tokenized at most once
        if i not in encoded:
            encoded[i] = encode_conversation(tokenizer, system + history[starts[i]:])
        return encoded[i]

    first = _first_fitting(lambda i: len(ids(i)) <= budget, len(starts))
    if first is None:
        raise PromptTooLong(f"the message needs {len(ids(len(starts) - 1))} prompt tokens; the model's window leaves "
                            f"{budget}")
    return ids(first), starts[first]


def cut_points(history: list[dict]) -> list[int]:
    """Where a prompt may start, oldest first: 0, then after each whole user/assistant exchange (a lone turn counts
    alone), down to the last turn. Every user message is one, so a history read from a user message on has the same
    cut points from there."""
    starts, s = [0], 0
    while len(history) - s > 1:
        pair = len(history) - s > 2 and history[s]["role"] == "user" and history[s + 1]["role"] == "assistant"
        s += 2 if pair else 1
        starts.append(s)
    return starts


def _first_fitting(fits, n: int) -> int | None:
    """The smallest i < n with ``fits(i)``, or None, where fits is false up to some i and true from there on (fewer
    turns never take more tokens). The whole conversation first (it usually fits: one tokenization), then the latest
    turn alone, then galloping back from it and bisecting: O(log n) calls, each on a prompt at most about twice the
    length of one that fits."""
    if fits(0):
        return 0
    bad, good = 0, n - 1
    if good == bad or not fits(good):
        return None
    step = 1
    while good - step > bad:
        if not fits(good - step):
            bad = good - step
            break
        good, step = good - step, step * 2
    while good - bad > 1:
        mid = (bad + good) // 2
        bad, good = (bad, mid) if fits(mid) else (mid, good)
    return good
