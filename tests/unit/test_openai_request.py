"""The OpenAI-compatible API's request rules without a server: what is accepted, what is a 400 naming its field, and
the engine pieces it adds (stop strings that are never streamed, per-row sampling with a seed)."""

from __future__ import annotations

import pytest

pytest.importorskip("transformers")

from tasks.chat.engine import Job, Sampling, pick  # noqa: E402
from tasks.chat.openai_api import parse  # noqa: E402
from tasks.chat.openai_errors import OpenAIError  # noqa: E402
from tasks.config import load_config  # noqa: E402
from tasks.demo import datagen  # noqa: E402
from tasks.demo import model as demo_model  # noqa: E402

CFG = load_config()
USER = [{"role": "user", "content": "Where is my order?"}]


def rejected(body: dict) -> OpenAIError:
    with pytest.raises(OpenAIError) as info:
        parse(body, CFG)
    assert info.value.status == 400
    return info.value


def test_a_plain_request_is_greedy_with_the_configured_reply_length():
    req = parse({"model": "ecommerce-chatbot", "messages": USER}, CFG)
    assert (req.model, req.sampling, req.stop, req.stream) == ("ecommerce-chatbot", None, (), False)
    assert req.max_tokens == CFG.chat.max_new_tokens and req.system is None and req.history == USER


def test_system_and_developer_messages_become_the_system_prompt_and_text_parts_are_joined():
    req = parse({"messages": [{"role": "system", "content": "Be brief."},
                              {"role": "developer", "content": "Answer in English."},
                              {"role": "user", "content": [{"type": "text", "text": "Where is "},
                                                           {"type": "text", "text": "my order?"}]}],
                 "max_completion_tokens": 7, "temperature": 0.7, "top_p": 0.9, "seed": -3, "stop": ["\n\n", "User:"],
                 "stream": True, "stream_options": {"include_usage": True}, "n": 1, "tools": [],
                 "response_format": {"type": "text"}, "presence_penalty": 0, "user": "someone"}, CFG)
    assert req.system == "Be brief.\n\nAnswer in English."
    assert req.history == USER and req.max_tokens == 7 and req.stop == ("\n\n", "User:")
    assert (req.sampling.temperature, req.sampling.top_p, req.sampling.seed) == (0.7, 0.9, 2**64 - 3)
    assert req.stream and req.include_usage


@pytest.mark.parametrize(("body", "param"), [
    ({"n": 2}, "n"),
    ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
    ({"tool_choice": "auto"}, "tool_choice"),
    ({"logprobs": True}, "logprobs"),
    ({"top_logprobs": 3}, "top_logprobs"),
    ({"response_format": {"type": "json_object"}}, "response_format"),
    ({"frequency_penalty": 0.5}, "frequency_penalty"),
    ({"logit_bias": {"42": 5}}, "logit_bias"),
    ({"modalities": ["text", "audio"]}, "modalities"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"max_tokens": True}, "max_tokens"),
    ({"max_completion_tokens": 10**6}, "max_completion_tokens"),
    ({"temperature": 2.5}, "temperature"),
    ({"temperature": "hot"}, "temperature"),
    ({"temperature": float("nan")}, "temperature"),
    ({"top_p": 0}, "top_p"),
    ({"seed": 2**70}, "seed"),
    ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"stop": [""]}, "stop"),
    ({"stream": "yes"}, "stream"),
    ({"model": 3}, "model"),
])
def test_unsupported_or_invalid_fields_are_a_400_naming_the_field(body, param):
    assert rejected({"messages": USER, **body}).param == param


@pytest.mark.parametrize(("messages", "param"), [
    (None, "messages"), ([], "messages"), ("hi", "messages"),
    ([{"role": "tool", "content": "x"}], "messages[0].role"),
    ([{"role": "user", "content": 5}], "messages[0].content"),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}], "messages[0].content"),
    ([{"role": "user", "content": "a\x00b"}], "messages[0].content"),
    ([{"role": "user", "content": "x" * 2001}], "messages[0].content"),
    ([*USER, {"role": "assistant", "content": "Prefilled"}], "messages"),
    ([{"role": "user", "content": "   "}], "messages"),
    ([{"role": "assistant", "content": "hi", "tool_calls": [{"id": "1"}]}, *USER], "messages[0].tool_calls"),
])
def test_bad_messages_name_the_message(messages, param):
    assert rejected({"messages": messages}).param == param


@pytest.fixture(scope="module")
def tokenizer():
    rows = datagen.generate_rows(200, seed=3)
    return demo_model.build_tokenizer([r["response"] for r in rows], vocab_size=600)


@pytest.mark.parametrize("stop", [("Refund",), ("zzz", " Tap"), ("2.",)])
def test_a_stop_string_ends_the_reply_and_no_part_of_it_is_streamed(tokenizer, stop):
    text = "Sure! 1. Open the app. 2. Tap Refund. 3. Done."
    ids = tokenizer.encode(text, add_special_tokens=False)
    job = Job(None, [], len(ids), stop=stop)
    for token in ids:
        job.tokens.append(token)
        job.emit_text(tokenizer)
        if job.stopped:
            break
    job.emit_text(tokenizer, final=True)
    pieces = [value for kind, value in list(job.events.queue) if kind == "token"]
    cut = min(i for i in (text.find(s) for s in stop) if i >= 0)
    assert job.stopped and job.sent == "".join(pieces) == text[:cut].rstrip()
    assert not any(s.strip() and s.strip() in "".join(pieces) for s in stop)


def test_text_that_might_start_a_stop_string_is_held_back_then_sent_when_it_does_not():
    class Chars:  # one character per token
        def decode(self, ids, **kwargs):
            return "".join(chr(i) for i in ids)

    job = Job(None, [], 100, stop=("User:",))
    sent = {}
    for ch in "Yes. Use the app":
        job.tokens.append(ord(ch))
        job.emit_text(Chars())
        sent[Chars().decode(job.tokens)] = job.sent
    assert sent["Yes. U"] == sent["Yes. Us"] == sent["Yes. Use"] == sent["Yes. Use "] == "Yes."
    assert sent["Yes. Use t"] == "Yes. Use t"  # no longer the start of "User:": released
    job.emit_text(Chars(), final=True)
    assert job.sent == "Yes. Use the app" and not job.stopped


def test_pick_is_argmax_for_greedy_rows_and_a_seeded_draw_for_sampled_ones():
    import torch

    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(0))
    greedy = Job(None, [], 5)
    draws = [pick(logits, [greedy, Job(None, [], 5, sampling=Sampling(1.5, 1.0, 11)), greedy]) for _ in range(2)]
    assert [d[0] for d in draws] == [int(logits[0].argmax())] * 2
    assert [d[2] for d in draws] == [int(logits[2].argmax())] * 2
    seeded = [pick(logits, [Job(None, [], 5, sampling=Sampling(1.5, 1.0, 11))] * 3)[1] for _ in range(3)]
    assert len(set(seeded)) == 1  # the same seed, the same draw
    many = {pick(logits[1:2], [Job(None, [], 5, sampling=Sampling(2.0, 1.0, s))])[0] for s in range(40)}
    assert len(many) > 5  # a flat-ish distribution at temperature 2: draws differ
    nucleus = {pick(logits[1:2], [Job(None, [], 5, sampling=Sampling(2.0, 1e-6, s))])[0] for s in range(20)}
    assert nucleus == {int(logits[1].argmax())}  # top_p that small keeps only the most likely token
