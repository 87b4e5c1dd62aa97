"""The generation worker: one thread per device owns the model and decodes every request, batched.

Requests enter a queue. Between two decode steps the worker prefills every request that has arrived (and fits in
the batch) in one forward pass, left-padded (up to ``PREFILL_TOKENS`` padded tokens per pass; a burst of 32 requests
is a few passes, not 32), takes each one's first token, then merges them into the running batch: every row's KV cache
is left-padded to a shared width and an attention mask hides the padding, so one forward pass advances every open
reply by one token. If a batched prefill raises, its requests are prefilled again one by one, so only a request
whose own prefill fails gets an error. A request
that arrives while others are decoding joins at the next step; a finished one leaves at once (its row is dropped from
the cache) without waiting for the rest. Decoding is greedy, the same as the evaluate step, unless a request carries
its own ``Sampling`` (the OpenAI-compatible API's temperature / top_p / seed): each row picks its next token by its own
rule from the batch's logits (``pick``), so greedy and sampled requests share a batch. A request's ``stop`` strings end
its reply at the first one, which is never sent (text that could be the start of one is held back until it is not).

When the handle carries a ``static_cache.StaticDecoder`` (on a GPU by default), ``StaticBatch`` replaces ``Batch``:
every row owns a slot of a preallocated KV cache and the decode step has fixed shapes, so it can run as one compiled
CUDA graph; admission, leaving and greedy decoding behave the same. Such a batch holds as many requests as the
handle's cache has rows (a reload sizes them from the re-read config), and only requests whose prompt + reply fit the
cache's width; a longer one (a handle kept across a reload that raised ``context_tokens``) decodes on the dynamic cache.

At most ``max_queue`` requests wait for a row (in the inbox or admitted to nothing yet); past that ``submit`` raises
``QueueFull`` (HTTP 503), so overload is refused at once instead of waiting into time-outs.

A request carries the model handle it was admitted with, and the worker only batches requests of one handle: after a
hot reload swaps the handle, requests already decoding finish on the old model and new ones wait for that batch to
drain, so no request ever sees a half-swapped model. With a canary two handles serve at once: requests are admitted
in arrival order, so once one for the other model waits, later ones of the running batch's model wait behind it and
the batch drains; neither model's requests starve while the other has traffic.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from functools import cache, cached_property

log = logging.getLogger("tasks.chat.engine")
PREFILL_TOKENS = 16384  # padded tokens (rows x longest prompt) of one batched prefill: bounds its activation memory


class QueueFull(RuntimeError):
    pass


@dataclass
class ModelHandle:
    """A loaded model with what the API reports about it."""

    tokenizer: object
    model: object
    version: str
    info: dict
    loaded_at: float = field(default_factory=time.time)
    decoder: object = None  # static_cache.StaticDecoder, or None for the dynamic cache

    @property
    def device(self):
        return next(self.model.parameters()).device

    @property
    def context_tokens(self) -> int:
        return int(getattr(self.model.config, "max_position_embeddings", 2048) or 2048)

    @cached_property
    def eos_ids(self) -> set[int]:
        """Token ids that end a reply; fixed for a loaded model, so computed once, not per generated token."""
        from tasks.ml.generation import eos_token_ids

        return set(eos_token_ids(self.model, self.tokenizer))


@dataclass
class Sampling:
    """Sampling of one request: temperature > 0 (0 is greedy, never a Sampling), nucleus ``top_p``, and a torch
    generator of its own (seeded from the request's ``seed``: the same seed gives the same reply)."""

    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None

    @cached_property
    def generator(self):
        import torch

        g = torch.Generator()
        if self.seed is None:
            g.seed()
        else:
            g.manual_seed(self.seed)
        return g


@dataclass
class Job:
    """One reply being generated. Events go to ``events``: ("token", text), ("done", stats), ("error", message)."""

    handle: ModelHandle
    prompt_ids: list[int]
    max_new_tokens: int
    events: queue.Queue = field(default_factory=queue.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)
    submitted: float = field(default_factory=time.monotonic)
    tokens: list[int] = field(default_factory=list)
    sent: str = ""
    first_token_at: float | None = None
    admitted_at: float | None = None  # its prefill began (after waiting for a row)
    sampling: Sampling | None = None  # None: greedy
    stop: tuple[str, ...] = ()  # the reply ends before the first of these strings
    stopped: bool = False  # a stop string was found: the reply is done
    # Incremental detokenisation: ``raw`` is the text of tokens[:read]; each step decodes only tokens[prefix:], where
    # tokens[prefix:read] are the last piece's tokens, kept as left context (a SentencePiece decode drops the
    # leading space of its first token, and byte-level pieces may be parts of one character).
    raw: str = ""
    prefix: int = 0
    read: int = 0

    def emit_text(self, tokenizer, final: bool = False) -> None:
        """Send the new part of the decoded text: O(piece) per token, not a decode of the whole reply. Leading and
        trailing whitespace are held back (the stored reply is stripped, so the streamed pieces add up to exactly
        the stored text), as is an incomplete UTF-8 character."""
        window = tokenizer.decode(self.tokens[self.prefix:], skip_special_tokens=True)
        if not final and window.endswith("\ufffd"):
            return
        context = tokenizer.decode(self.tokens[self.prefix:self.read], skip_special_tokens=True)
        if window.startswith(context):
            self.raw += window[len(context):]
        else:  # a decoder that rewrites its context (rare): fall back to the whole reply once
            self.raw = tokenizer.decode(self.tokens, skip_special_tokens=True)
        self.prefix, self.read = self.read, len(self.tokens)
        text = self.raw.strip()
        if self.stop:
            text = self._before_stop(text, final)
        if text.startswith(self.sent) and len(text) > len(self.sent):
            self.events.put(("token", text[len(self.sent):]))
            self.sent = text

    def _before_stop(self, text: str, final: bool) -> str:
        """The part of ``text`` that may be sent: up to the first stop string (then the reply is done), and short of
        a tail that could still become one."""
        cuts = [i for i in (text.find(s) for s in self.stop) if i >= 0]
        if cuts:
            self.stopped = True
            return text[:min(cuts)].rstrip()
        if final:
            return text
        held = max((n for s in self.stop for n in range(min(len(s) - 1, len(text)), 0, -1)
                    if text.endswith(s[:n])), default=0)
        return text[:len(text) - held].rstrip()


@dataclass
class Call:
    """A function the worker thread runs between two decode steps (a CUDA graph is captured per thread, so the static
    decode step's capture must happen on the thread that will replay it)."""

    fn: object
    events: queue.Queue = field(default_factory=queue.Queue)

    def run(self) -> None:
        try:
            self.events.put(("done", self.fn()))
        except Exception as exc:
            self.events.put(("error", f"{type(exc).__name__}: {exc}"))


class Generator:
    """The single generation worker of a process; ``submit`` is thread-safe."""

    prefill_passes = prefilled = 0  # forward passes of prefill and the requests they carried (bench/chat.py reports)
    # Requests accepted by ``submit`` and those the worker took off the queue (admitted to a row, or cancelled): the
    # worker moves the inbox into ``pending`` at every step, so only a count over both makes ``max_queue`` refuse.
    submitted = taken = 0

    def __init__(self, max_batch_size: int = 16, max_queue: int = 256):
        self.max_batch_size = max_batch_size  # rows of a dynamic-cache batch; a static one has its decoder's rows
        self.max_queue = max_queue
        self.inbox: queue.Queue[Job | Call] = queue.Queue()  # unbounded: ``submit`` bounds the requests in it
        self.pending: deque[Job | Call] = deque()
        self.steps = 0
        self._submit_lock = threading.Lock()
        self._thread = threading.Thread(target=self._loop, name="generation-worker", daemon=True)
        self._thread.start()

    def submit(self, job: Job) -> Job:
        """Queue ``job``; QueueFull (HTTP 503) when ``max_queue`` requests already wait for a decode row."""
        with self._submit_lock:  # request threads race here; only the worker thread moves ``taken``
            if self.queued >= self.max_queue:
                raise QueueFull("the generation queue is full")
            self.submitted += 1
        self.inbox.put_nowait(job)
        return job

    def call(self, fn, timeout: float):
        """Run ``fn`` on the worker thread and return its result (RuntimeError when it raised or timed out)."""
        call = Call(fn)
        self.inbox.put(call, timeout=timeout)
        try:
            kind, value = call.events.get(timeout=timeout)
        except queue.Empty as exc:
            raise RuntimeError(f"the generation worker did not run the call within {timeout:.0f}s") from exc
        if kind == "error":
            raise RuntimeError(value)
        return value

    @property
    def queued(self) -> int:
        """Requests waiting for a decode row, in the inbox or ``pending`` (at most ``max_queue``)."""
        return self.submitted - self.taken

    # --- worker thread ---------------------------------------------------------------------------------------
    def _loop(self) -> None:
        batch = Batch()
        while True:
            try:
                if not batch.jobs and not self.pending:
                    self.pending.append(self.inbox.get())
                while True:
                    self.pending.append(self.inbox.get_nowait())
            except queue.Empty:
                pass
            try:
                batch = self._admit(batch)
                if batch.jobs:
                    batch.step()
                    self.steps += 1
            except Exception as exc:  # a failed step fails its requests, never the worker
                log.exception("generation step failed")
                for job in [*batch.jobs]:
                    job.events.put(("error", f"generation failed: {type(exc).__name__}"))
                batch = Batch()

    def _admit(self, batch):
        """Prefill waiting requests of the batch's model into free rows (all of them when the batch is empty),
        together (``prefill_group``).

        A request whose prefill raises gets its error event at once and the others go on being admitted; whatever
        happens, every request taken from ``pending`` is either in the batch, answered, or back in ``pending``."""
        waiting, group, cancelled = deque(), [], 0
        other_waits = False  # a request for another lane is waiting: admit nothing after it (arrival order)
        try:
            while self.pending:
                job = self.pending.popleft()
                if isinstance(job, Call):
                    job.run()
                    continue
                if job.cancelled.is_set():
                    cancelled += 1
                    continue
                lane = batch_lane(batch) if batch.jobs else job_lane(group[0] if group else job)
                other_waits = other_waits or not joins(lane, job)
                if not other_waits and not batch.jobs and not group and batch_lane(batch) != lane:
                    batch = StaticBatch(job.handle) if lane[1] else Batch()
                if other_waits or len(batch.jobs) + len(group) >= self._rows(batch):
                    waiting.append(job)
                    continue
                group.append(job)
        finally:
            waiting.extend(self.pending)
            self.pending = waiting
            self.taken += cancelled + len(group)
            passes = prefill_group(batch, group)
            self.prefill_passes += passes
            self.prefilled += len(group)
        return batch

    def _rows(self, batch) -> int:
        """Rows of ``batch``: a static cache has the rows its handle was loaded with (a reload sizes them from the
        re-read config, this worker's ``max_batch_size`` is the start-up one)."""
        return batch.decoder.rows if isinstance(batch, StaticBatch) else self.max_batch_size


def job_lane(job: Job) -> tuple:
    """(model, static cache?) of the batch ``job`` decodes in: the static slots when prompt + reply fit their width.
    A handle kept across a reload (a promotion) keeps the width it was loaded with while the live config may have
    raised context_tokens: such a request decodes on the dynamic cache rather than have its reply cut."""
    decoder = job.handle.decoder
    # The static step picks greedily inside its compiled graph: a sampled request decodes on the dynamic cache.
    fits = decoder is not None and job.sampling is None and len(job.prompt_ids) + job.max_new_tokens <= decoder.width
    return id(job.handle), fits  # the handle's identity: two loads of one version are two models


def batch_lane(batch) -> tuple:
    return id(batch.handle), isinstance(batch, StaticBatch)


def joins(lane: tuple, job: Job) -> bool:
    """Whether ``job`` may decode in a batch of ``lane``: same model, and slots it fits (a dynamic cache takes any)."""
    handle, static = lane
    return id(job.handle) == handle and (not static or job_lane(job)[1])


def prefill_group(batch, jobs: list[Job]) -> int:
    """Prefill ``jobs`` into ``batch`` in passes of up to PREFILL_TOKENS padded tokens (prompts of similar length
    together); a pass that raises is redone one request at a time, and a request whose own prefill raises gets an
    error event. Every job ends up in the batch or answered. Returns the number of forward passes tried."""
    passes = 0
    jobs = sorted(jobs, key=lambda j: len(j.prompt_ids))
    chunks, chunk = [], []
    for job in jobs:
        if chunk and (len(chunk) + 1) * len(job.prompt_ids) > PREFILL_TOKENS:
            chunks.append(chunk)
            chunk = []
        chunk.append(job)
    chunks += [chunk] if chunk else []
    for chunk in chunks:
        passes += 1
        try:
            batch.add(chunk)
            continue
        except Exception as exc:  # noqa: BLE001 -- find out below which request it was
            error = exc
            if len(chunk) == 1:
                _fail_prefill(chunk[0], exc)
                continue
            log.warning("batched prefill of %d requests failed (%s: %s); prefilling them one by one", len(chunk),
                        type(exc).__name__, str(exc)[:200])
        for job in chunk:
            if job.first_token_at is not None:  # the pass failed after its first tokens were sent: end it cleanly
                _fail_prefill(job, error)
                continue
            passes += 1
            try:
                batch.add([job])
            except Exception as one:  # noqa: BLE001 -- this request's prefill failed: fail it alone
                _fail_prefill(job, one)
    return passes


def _fail_prefill(job: Job, exc: Exception) -> None:
    log.error("prefill of a %d-token prompt failed: %s: %s", len(job.prompt_ids), type(exc).__name__, exc)
    job.events.put(("error", f"generation failed: {type(exc).__name__}"))


class Batch:
    """Rows decoding together on one model: their tokens, a shared left-padded KV cache and its attention mask."""

    def __init__(self):
        self.jobs: list[Job] = []
        self.handle: ModelHandle | None = None
        self.cache = None  # DynamicCache [rows, heads, width, dim] per layer
        self.mask = None  # [rows, width] long, 1 = real token
        self.positions = None  # [rows] next position id per row

    def add(self, jobs: list[Job]) -> None:
        """Prefill ``jobs`` (one handle, this batch's when it has rows) together and merge the open ones in."""
        cache, mask, open_rows = prefill(jobs)
        if not open_rows:
            return  # all finished with their first token (EOS or max_new_tokens=1): none joins the batch
        if len(open_rows) < len(jobs):
            import torch

            index = torch.tensor(open_rows, dtype=torch.long, device=mask.device)
            cache.batch_select_indices(index)
            mask = mask[index]
            first_real = int(mask.argmax(dim=1).min())  # the longest prompt may have finished: drop its columns
            if first_real > 0:
                cache, mask = _slice_cache(cache, first_real), mask[:, first_real:]
        new = [jobs[r] for r in open_rows]
        positions = mask.sum(dim=1)  # each row's next position: its prompt length
        if not self.jobs:
            self.handle, self.cache, self.mask, self.positions, self.jobs = new[0].handle, cache, mask, positions, new
            return
        import torch

        self.cache, self.mask = _merge(self.cache, self.mask, cache, mask)
        self.positions = torch.cat([self.positions, positions])
        self.jobs += new

    def step(self) -> None:
        import torch

        keep = [i for i, j in enumerate(self.jobs) if not j.cancelled.is_set()]
        if len(keep) < len(self.jobs):
            self._select(keep)
            if not self.jobs:
                return
        last = torch.tensor([[j.tokens[-1]] for j in self.jobs], dtype=torch.long, device=self.mask.device)
        self.mask = torch.cat([self.mask, torch.ones((len(self.jobs), 1), dtype=torch.long,
                                                     device=self.mask.device)], dim=1)
        with torch.inference_mode():
            out = self.handle.model(input_ids=last, attention_mask=self.mask, position_ids=self.positions[:, None],
                                    use_cache=True, **{_cache_kw(type(self.handle.model)): self.cache})
        self.cache = _cache_of(out)
        self.positions = self.positions + 1
        tokens = pick(out.logits[:, -1], self.jobs)
        keep = [i for i, (job, tok) in enumerate(zip(self.jobs, tokens, strict=True)) if not accept(job, tok)]
        if len(keep) < len(self.jobs):
            self._select(keep)

    def _select(self, rows: list[int]) -> None:
        import torch

        self.jobs = [self.jobs[i] for i in rows]
        if not self.jobs:
            self.__init__()
            return
        index = torch.tensor(rows, dtype=torch.long, device=self.mask.device)
        self.cache.batch_select_indices(index)
        self.mask, self.positions = self.mask[index], self.positions[index]
        # Columns that are padding in every remaining row cost compute in every step: drop them.
        first_real = int(self.mask.argmax(dim=1).min())
        if first_real > 0:
            self.cache = _slice_cache(self.cache, first_real)
            self.mask = self.mask[:, first_real:]


def prefill(jobs: list[Job]):
    """Run the prompts of ``jobs`` (one handle) in one forward pass, left-padded to the longest, and take each one's
    first token. Positions count from each prompt's first real token, so a padded row computes what it would alone.
    Returns (KV cache [rows, ..., width, ...], mask [rows, width], rows whose job is still open)."""
    import torch

    h = jobs[0].handle
    started = time.monotonic()
    for job in jobs:
        job.admitted_at = job.admitted_at or started  # a retried prefill keeps the first time
    width = max(len(j.prompt_ids) for j in jobs)
    ids = torch.zeros((len(jobs), width), dtype=torch.long)  # padding ids are masked: any valid id will do
    mask = torch.zeros((len(jobs), width), dtype=torch.long)
    for row, job in enumerate(jobs):
        ids[row, width - len(job.prompt_ids):] = torch.tensor(job.prompt_ids)
        mask[row, width - len(job.prompt_ids):] = 1
    positions = (mask.cumsum(dim=1) - 1).clamp(min=0)
    ids, mask, positions = ids.to(h.device), mask.to(h.device), positions.to(h.device)
    with torch.inference_mode():
        out = h.model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, logits_to_keep=1)
    first = pick(out.logits[:, -1], jobs)
    now = time.monotonic()
    open_rows = []
    for row, (job, token) in enumerate(zip(jobs, first, strict=True)):
        job.first_token_at = now
        if not accept(job, token):
            open_rows.append(row)
    return _cache_of(out), mask, open_rows


def pick(logits, jobs: list[Job]) -> list[int]:
    """Each row's next token from ``logits`` [rows, vocab]: the argmax, or a draw by the row's own ``Sampling``."""
    import torch

    tokens = logits.argmax(dim=-1).tolist()
    for row, job in enumerate(jobs):
        s = job.sampling
        if s is None:
            continue
        probs = torch.softmax(logits[row].float().cpu() / s.temperature, dim=-1)
        if s.top_p < 1.0:  # the smallest set of most likely tokens whose mass reaches top_p
            sorted_p, order = probs.sort(descending=True)
            outside = sorted_p.cumsum(0) - sorted_p >= s.top_p
            probs[order[outside]] = 0.0
        tokens[row] = int(torch.multinomial(probs, 1, generator=s.generator))
    return tokens


def accept(job: Job, token: int) -> bool:
    """Record a token; True when the job is finished (and its done event sent)."""
    h = job.handle
    eos = token in h.eos_ids
    if not eos:
        job.tokens.append(token)
        job.emit_text(h.tokenizer)
    eos = eos or job.stopped
    if eos or len(job.tokens) >= job.max_new_tokens:
        job.emit_text(h.tokenizer, final=True)
        job.events.put(("done", {"finish_reason": "stop" if eos else "length",
                                 "completion_tokens": len(job.tokens)}))
        return True
    return False


class StaticBatch:
    """Rows decoding together in the fixed slots of a handle's ``StaticDecoder``; free slots decode a dummy token."""

    def __init__(self, handle: ModelHandle):
        self.handle, self.decoder = handle, handle.decoder
        self.slots: list[Job | None] = [None] * self.decoder.rows
        self.positions = [0] * self.decoder.rows

    @property
    def jobs(self) -> list[Job]:
        return [j for j in self.slots if j is not None]

    def add(self, jobs: list[Job]) -> None:
        """Prefill ``jobs`` together and copy each open one's prompt cache into a free slot."""
        for job in jobs:  # the slot holds `width` tokens (``job_lane`` sends only requests that fit): a safety cut
            job.max_new_tokens = max(1, min(job.max_new_tokens, self.decoder.width - len(job.prompt_ids)))
        cache, mask, open_rows = prefill(jobs)
        width = mask.shape[1]
        for r in open_rows:
            row = self.slots.index(None)
            start = width - len(jobs[r].prompt_ids)
            self.positions[row] = self.decoder.load_prefix(row, cache, index=r, start=start)
            self.slots[row] = jobs[r]

    def step(self) -> None:
        self.slots = [None if j is not None and j.cancelled.is_set() else j for j in self.slots]
        if not self.jobs:
            return
        last = [j.tokens[-1] if j is not None else 0 for j in self.slots]
        tokens = self.decoder.step(last, self.positions)
        for row, (job, token) in enumerate(zip(self.slots, tokens, strict=True)):
            if job is None:
                continue
            self.positions[row] += 1
            if accept(job, token):
                self.slots[row] = None


@cache
def _cache_kw(model_cls) -> str:
    """transformers 5.2x renamed the forward's ``past_key_values`` to ``cache`` (the GPU image may be older)."""
    import inspect

    return "cache" if "cache" in inspect.signature(model_cls.forward).parameters else "past_key_values"


def _cache_of(out):
    cache = getattr(out, "cache", None)
    return cache if cache is not None else out.past_key_values


def _layers(cache) -> list[tuple]:
    return [(layer.keys, layer.values) for layer in cache.layers]


def _merge(cache_a, mask_a, cache_b, mask_b):
    """Stack two KV caches along the batch, left-padding the shorter one (its mask is 0 over the padding)."""
    import torch
    import torch.nn.functional as F  # noqa: N812
    from transformers import DynamicCache

    wa, wb = mask_a.shape[1], mask_b.shape[1]
    width = max(wa, wb)

    def pad(t, w):  # [rows, heads, w, dim] -> left-pad the sequence axis to width
        return F.pad(t, (0, 0, width - w, 0)) if w < width else t

    layers = [(torch.cat([pad(ka, wa), pad(kb, wb)]), torch.cat([pad(va, wa), pad(vb, wb)]))
              for (ka, va), (kb, vb) in zip(_layers(cache_a), _layers(cache_b), strict=True)]
    mask = torch.cat([F.pad(mask_a, (width - wa, 0)), F.pad(mask_b, (width - wb, 0))])
    return DynamicCache(layers), mask


def _slice_cache(cache, start: int):
    from transformers import DynamicCache

    return DynamicCache([(k[:, :, start:], v[:, :, start:]) for k, v in _layers(cache)])
