"""The generation worker's limits (issue 21): a reload that changes the static cache's size, and ``chat.max_queue``.

A reload re-reads the config and sizes the new model's static KV cache from it, while the worker was started with
the start-up batch size: admission must follow the cache the handle really has (rows, and width for prompt + reply).
``max_queue`` bounds every request waiting for a decode row, so overload is refused at once (HTTP 503), not queued
into time-outs. The model is the tiny Llama-architecture chat model of ``tests/conftest.py``.
"""

from __future__ import annotations

import threading

import pytest
import yaml

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from tasks.chat import static_cache as static  # noqa: E402
from tasks.chat.engine import Call, Generator, Job, ModelHandle, QueueFull  # noqa: E402
from tasks.ml import generation  # noqa: E402
from tests.unit.test_chat_engine import load_tiny  # noqa: E402

QUESTIONS = ["Where is my order?", "cancel my subscription", "hi", "Do you ship to Canada?",
             "How do I change the shipping address on my account?", "I want a refund for the broken headphones.",
             "Can I pay with a gift card?"]


@pytest.fixture(scope="module")
def loaded(tiny_base_model):
    return load_tiny(tiny_base_model, QUESTIONS)


def finish(job: Job, timeout: float = 120) -> tuple:
    while (event := job.events.get(timeout=timeout))[0] == "token":
        pass
    return event


def burst(worker: Generator, handle, ids: list[list[int]], max_new: int) -> list[Job]:
    """Queue every request while the worker is held in a call, so they are all waiting when it admits."""
    gate = threading.Event()
    worker.inbox.put(Call(lambda: gate.wait(30)))
    jobs = [worker.submit(Job(handle, x, max_new)) for x in ids]
    gate.set()
    return jobs


def test_a_reload_that_lowers_max_batch_size_serves_a_burst_larger_than_the_new_rows(loaded, tiny_base_model,
                                                                                    tmp_path):
    """Started with 4 rows, reloaded (config re-read) with 2: a burst of 7 fills the 2 slots and waits for them."""
    from tasks.chat import ModelState
    from tasks.chat.models import load
    from tasks.config import load_config

    tokenizer, model, prompts = loaded
    path = tmp_path / "chat.yaml"

    def write(rows: int) -> None:
        path.write_text(yaml.safe_dump({"chat": {"max_batch_size": rows, "static_cache": "on", "compile": "off"}}))

    write(4)
    state = ModelState(load_config(path), load, config_source=str(path))
    state.reload(str(tiny_base_model), wait=True)
    assert state.handle.decoder.rows == 4 and state.generator.max_batch_size == 4
    write(2)
    state.reload(str(tiny_base_model), wait=True)
    assert state.reload_state["state"] == "idle" and state.handle.decoder.rows == 2
    ids = generation.encode_prompts(tokenizer, prompts)
    jobs = burst(state.generator, state.handle, ids, 6)
    events = [finish(job) for job in jobs]
    assert [e[0] for e in events] == ["done"] * len(jobs), events
    assert [j.tokens for j in jobs] == [generation.generate_token_ids_one_at_a_time(model, tokenizer, [p], 6)[0]
                                        for p in prompts]


class CountingDecoder(static.StaticDecoder):
    steps = 0

    def step(self, tokens, positions):
        self.steps += 1
        return super().step(tokens, positions)


def test_a_static_cache_narrower_than_prompt_plus_reply_still_gives_the_whole_reply(loaded):
    """A promoted handle keeps the cache width it was loaded with, while the live config may have raised
    context_tokens: a request that does not fit its slot decodes on the dynamic cache, uncut (with a request that
    fits beside it), and one that fits, alone, still decodes in the slots."""
    tokenizer, model, prompts = loaded
    pair = [prompts[4], prompts[2]]  # a long question, then "hi"
    ids = generation.encode_prompts(tokenizer, pair)
    handle = ModelHandle(tokenizer, model, "promoted", {})
    handle.decoder = CountingDecoder(model, rows=2, width=len(ids[0]) + 4)
    worker = Generator(max_batch_size=2)
    jobs = burst(worker, handle, ids, 12)
    assert [finish(job)[0] for job in jobs] == ["done", "done"]
    assert [job.tokens for job in jobs] == [generation.generate_token_ids_one_at_a_time(model, tokenizer, [p], 12)[0]
                                            for p in pair]
    assert handle.decoder.steps == 0  # the long one does not fit: both decoded on the dynamic cache
    assert len(ids[1]) + 3 <= handle.decoder.width
    short = worker.submit(Job(handle, ids[1], 3))  # fits: prompt + reply <= width
    assert finish(short)[0] == "done"
    assert short.tokens == generation.generate_token_ids_one_at_a_time(model, tokenizer, pair[1:], 3)[0]
    assert handle.decoder.steps > 0, short.tokens


class GatedModel(torch.nn.Module):
    """The real model; every forward pass first says it started (``entered``) and then waits for one ``go``, so the
    test moves the worker one pass at a time (the worker empties its inbox between two passes)."""

    def __init__(self, model):
        super().__init__()
        self.inner, self.config = model, model.config
        self.entered, self.go, self.opened = threading.Semaphore(0), threading.Semaphore(0), threading.Event()

    def forward(self, input_ids=None, **kwargs):
        self.entered.release()
        if not self.opened.is_set():
            assert self.go.acquire(timeout=60), "the test never let this forward pass run"
        return self.inner(input_ids=input_ids, **kwargs)

    def step(self) -> None:
        """Let the blocked pass finish and wait until the worker blocks in its next one."""
        self.go.release()
        assert self.entered.acquire(timeout=60)

    def open(self) -> None:
        self.opened.set()
        self.go.release()


class NoEosHandle(ModelHandle):
    eos_ids = frozenset()  # every reply runs to max_new_tokens: the first one holds the only row for the whole test


def test_max_queue_bounds_the_requests_waiting_and_refuses_the_rest(loaded):
    """One row, max_queue=2, 50 requests arriving one per decode step while the first reply holds the row: at most 2
    wait at any time, the rest get QueueFull (HTTP 503), and the admitted ones complete."""
    tokenizer, model, prompts = loaded
    gated = GatedModel(model)
    handle = NoEosHandle(tokenizer, gated, "t", {})
    ids = generation.encode_prompts(tokenizer, prompts[:1])[0]
    worker = Generator(max_batch_size=1, max_queue=2)
    accepted = [worker.submit(Job(handle, ids, 60))]
    assert gated.entered.acquire(timeout=60)  # the first request's prefill is running
    refused, most_waiting = 0, 0
    for _ in range(49):
        try:
            accepted.append(worker.submit(Job(handle, ids, 60)))
        except QueueFull:
            refused += 1
        most_waiting = max(most_waiting, worker.queued)
        gated.step()
    assert refused > 0
    assert most_waiting <= 2
    assert len(accepted) == 3 and refused == 47  # the row is busy for 60 passes: only 2 can wait meanwhile
    gated.open()
    for job in accepted:
        assert finish(job)[0] == "done" and len(job.tokens) == 60
    assert worker.queued == 0
