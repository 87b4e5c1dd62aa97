"""The chat generation worker gives exactly the greedy tokens of one-at-a-time ``generate``, on both cache paths.

Requests are submitted together so they are admitted while others decode, with more requests than rows so rows are
reused: on the static path a reused slot still holds the previous request's longer keys beyond the new request's
position, which the mask must hide. The model is the tiny Llama-architecture chat model built like the demo base
(``tiny_base_model``). The static path runs eagerly and compiled (inductor on CPU here; the CUDA-graph variant of the
same compiled step runs in bench/gpu.sh).
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from tasks.chat import static_cache as static  # noqa: E402
from tasks.chat.engine import Generator, Job, ModelHandle  # noqa: E402
from tasks.ml import generation  # noqa: E402

QUESTIONS = [
    "Where is my order?",
    "I want a refund for the broken headphones I received yesterday, they do not turn on at all.",
    "How do I change the shipping address on my account before the parcel leaves the warehouse?",
    "cancel my subscription",
    "Can I pay with a gift card and a credit card for the same order, and how do I do that on the app?",
    "hi",
    "The invoice for order 1234 shows the wrong billing name; please send a corrected invoice to my email.",
    "Do you ship to Canada?",
]
MAX_NEW = [14, 9, 14, 5, 14, 12, 14, 7]  # different lengths: rows leave at different steps


def load_tiny(model_dir, questions: list[str]) -> tuple:
    """(tokenizer, float32 model, one rendered single-turn prompt per question) of the tiny test model."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    prompts = [tokenizer.apply_chat_template([{"role": "user", "content": q}], tokenize=False,
                                             add_generation_prompt=True) for q in questions]
    return tokenizer, model, prompts


@pytest.fixture(scope="module")
def loaded(tiny_base_model):
    return load_tiny(tiny_base_model, QUESTIONS)


def reference(tokenizer, model, prompts) -> list[list[int]]:
    return [generation.generate_token_ids_one_at_a_time(model, tokenizer, [p], n)[0]
            for p, n in zip(prompts, MAX_NEW, strict=True)]


def run_worker(handle, prompts, max_batch_size: int) -> list[tuple[list[int], dict]]:
    worker = Generator(max_batch_size=max_batch_size)
    jobs = [Job(handle, ids, n) for ids, n in
            zip(generation.encode_prompts(handle.tokenizer, prompts), MAX_NEW, strict=True)]
    for job in jobs:  # all at once: later ones join a batch that is already decoding
        worker.submit(job)
    results = []
    for job in jobs:
        while (event := job.events.get(timeout=120))[0] == "token":
            pass
        assert event[0] == "done", event
        results.append((list(job.tokens), event[1]))
    return results, worker


@pytest.mark.parametrize("path", ["dynamic", "static", "static-compiled"])
def test_worker_tokens_equal_one_at_a_time_generate(loaded, path):
    tokenizer, model, prompts = loaded
    handle = ModelHandle(tokenizer, model, "t", {})
    if path != "dynamic":
        handle.decoder = static.StaticDecoder(model, rows=3, width=model.config.max_position_embeddings,
                                              compile_step=path == "static-compiled")
    expected = reference(tokenizer, model, prompts)
    results, worker = run_worker(handle, prompts, max_batch_size=3)
    if path == "static-compiled":
        assert handle.decoder.compiled is not None  # it did not fall back to eager
    assert [tokens for tokens, _ in results] == expected
    for (tokens, done), limit in zip(results, MAX_NEW, strict=True):
        assert done["completion_tokens"] == len(tokens)
        assert done["finish_reason"] == ("length" if len(tokens) == limit else "stop")
    assert worker.steps > 0


def test_static_slot_hides_stale_keys_of_a_longer_earlier_request(loaded):
    """One row, used first by the longest prompt and then by the shortest: the short one must not see the rest."""
    tokenizer, model, prompts = loaded
    longest = max(range(len(prompts)), key=lambda i: len(prompts[i]))
    shortest = min(range(len(prompts)), key=lambda i: len(prompts[i]))
    handle = ModelHandle(tokenizer, model, "t", {})
    handle.decoder = static.StaticDecoder(model, rows=1, width=model.config.max_position_embeddings)
    pair = [prompts[longest], prompts[shortest]]
    worker = Generator(max_batch_size=1)
    ids = generation.encode_prompts(tokenizer, pair)
    jobs = [worker.submit(Job(handle, x, 14)) for x in ids]
    got = []
    for job in jobs:
        while job.events.get(timeout=120)[0] == "token":
            pass
        got.append(job.tokens)
    assert got == [generation.generate_token_ids_one_at_a_time(model, tokenizer, [p], 14)[0] for p in pair]
    assert len(ids[0]) > len(ids[1]) + 10  # the stale region really is there


def test_static_path_is_chosen_by_config_and_architecture(loaded):
    from tasks.config import ChatConfig

    _, model, _ = loaded
    assert static.build(model, ChatConfig(static_cache="off"), rows=2, width=64) is None
    assert static.build(model, ChatConfig(static_cache="auto"), rows=2, width=64) is None  # CPU: dynamic cache
    decoder = static.build(model, ChatConfig(static_cache="on", compile="off"), rows=2, width=64)
    assert decoder is not None and decoder.compiled is None
    assert decoder.keys[0].shape == (2, model.config.num_key_value_heads, 64, decoder.head_dim)
    assert static.unsupported_reason(torch.nn.Linear(2, 2)) is not None


def test_reload_warms_up_the_static_step_on_the_worker_or_falls_back(loaded):
    """The warm-up runs before the swap: compiling on the loader thread, then again on the generation thread (where a
    GPU captures the CUDA graph it will replay); a decoder whose step cannot run is dropped and the version serves
    on the dynamic cache instead of failing to load."""
    import threading

    from tasks.chat import ModelState
    from tasks.config import Config

    tokenizer, model, prompts = loaded
    threads = []

    class Probe(static.StaticDecoder):
        def warm_up(self):
            threads.append(threading.current_thread().name)
            return super().warm_up()

    class Broken(static.StaticDecoder):
        def _forward(self, ids, pos):
            raise RuntimeError("no kernel for this device")

    def loader(decoder_cls):
        def load(cfg, uri):
            handle = ModelHandle(tokenizer, model, uri or "v1", {})
            handle.decoder = decoder_cls(model, rows=2, width=model.config.max_position_embeddings,
                                         compile_step=decoder_cls is Probe)
            return handle
        return load

    state = ModelState(Config(), loader(Probe))
    state.reload(wait=True)
    assert threads == ["model-loader", "generation-worker"] and state.handle.decoder is not None
    assert state.handle.decoder.compiled is not None  # compiled on the loader thread, replayed on the worker
    ids = generation.encode_prompts(tokenizer, prompts[:1])[0]
    job = state.generator.submit(Job(state.handle, ids, 6))
    while job.events.get(timeout=60)[0] == "token":
        pass
    assert job.tokens == generation.generate_token_ids_one_at_a_time(model, tokenizer, prompts[:1], 6)[0]

    state.loader = loader(Broken)
    state.reload("v2", wait=True)
    assert state.handle.version == "v2" and state.handle.decoder is None
    job = state.generator.submit(Job(state.handle, ids, 6))
    while (event := job.events.get(timeout=60))[0] == "token":
        pass
    assert event[0] == "done" and len(job.tokens) > 0


class PoisonedModel(torch.nn.Module):
    """The real model, except that a prefill holding the poisoned token id raises in its forward pass."""

    def __init__(self, model, poison: int):
        super().__init__()
        self.inner, self.poison, self.config = model, poison, model.config

    def forward(self, input_ids=None, **kwargs):
        if input_ids.shape[1] > 1 and bool((input_ids == self.poison).any()):  # a prefill holding the poison
            raise RuntimeError("prefill exploded")
        return self.inner(input_ids=input_ids, **kwargs)


@pytest.mark.parametrize("path", ["dynamic", "static"])
def test_a_failing_prefill_fails_only_its_own_request_at_once(loaded, path):
    """Three requests arrive together; the second one's prefill raises. It gets its error event right away (not
    after request_timeout_s) and the first and third still get exactly their one-at-a-time tokens."""
    import time

    tokenizer, model, prompts = loaded
    ids = generation.encode_prompts(tokenizer, prompts[:3])
    poison = 999_999  # no real token: the poisoned prompt is the second one with its first token id swapped
    bad = [ids[1][0], poison, *ids[1][2:]]
    handle = ModelHandle(tokenizer, PoisonedModel(model, poison), "t", {})
    if path == "static":
        handle.decoder = static.StaticDecoder(model, rows=3, width=model.config.max_position_embeddings)
    worker = Generator(max_batch_size=3)
    jobs = [Job(handle, ids[0], 8), Job(handle, bad, 8), Job(handle, ids[2], 8)]
    started = time.monotonic()
    for job in jobs:
        worker.submit(job)
    kind, message = jobs[1].events.get(timeout=30)
    assert (kind, message) == ("error", "generation failed: RuntimeError")
    assert time.monotonic() - started < 30
    for job, prompt in ((jobs[0], prompts[0]), (jobs[2], prompts[2])):
        while (event := job.events.get(timeout=60))[0] == "token":
            pass
        assert event[0] == "done", event
        assert job.tokens == generation.generate_token_ids_one_at_a_time(model, tokenizer, [prompt], 8)[0]


class CountingModel(PoisonedModel):
    """The real model, recording the shape of every prefill (a forward of more than one token per row)."""

    def __init__(self, model):
        super().__init__(model, poison=-1)
        self.prefills = []

    def forward(self, input_ids=None, **kwargs):
        if input_ids.shape[1] > 1:
            self.prefills.append(tuple(input_ids.shape))
        return self.inner(input_ids=input_ids, **kwargs)


@pytest.mark.parametrize("path", ["dynamic", "static"])
@pytest.mark.parametrize("budget", [None, 200])
def test_requests_arriving_together_are_prefilled_in_one_padded_pass(loaded, path, budget, monkeypatch):
    """Eight requests queued while the worker is busy are prefilled together, left-padded (one pass; with a padded
    token budget of 200, in passes of similar lengths under it), all get their first token at the same moment, and
    every reply is still exactly the one-at-a-time greedy reply."""
    import threading

    from tasks.chat import engine
    from tasks.chat.engine import Call

    if budget:
        monkeypatch.setattr(engine, "PREFILL_TOKENS", budget)
    tokenizer, model, prompts = loaded
    counting = CountingModel(model)
    handle = ModelHandle(tokenizer, counting, "t", {})
    if path == "static":
        handle.decoder = static.StaticDecoder(model, rows=8, width=model.config.max_position_embeddings)
    worker, gate = Generator(max_batch_size=8), threading.Event()
    worker.inbox.put(Call(lambda: gate.wait(30)))  # the worker is busy until every request is queued
    ids = generation.encode_prompts(tokenizer, prompts)
    jobs = [worker.submit(Job(handle, x, n)) for x, n in zip(ids, MAX_NEW, strict=True)]
    gate.set()
    for job in jobs:
        while (event := job.events.get(timeout=120))[0] == "token":
            pass
        assert event[0] == "done", event
    assert [job.tokens for job in jobs] == reference(tokenizer, model, prompts)
    lengths = sorted(len(x) for x in ids)
    if budget is None:
        assert counting.prefills == [(8, lengths[-1])]  # one pass, padded to the longest prompt
        assert len({job.first_token_at for job in jobs}) == 1
        assert (worker.prefill_passes, worker.prefilled) == (1, 8)  # what bench/chat.py reports
    else:
        assert 1 < len(counting.prefills) < 8 and sum(rows for rows, _ in counting.prefills) == 8
        assert (worker.prefill_passes, worker.prefilled) == (len(counting.prefills), 8)
        assert all(rows * width <= budget or rows == 1 for rows, width in counting.prefills)
