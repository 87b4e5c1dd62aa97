"""LoRA training machinery shared by the fine-tune step and the HPO trials (litgpt style: setup -> fit).

Conversations are rendered with the tokenizer's own chat template; only assistant tokens carry labels.

Batches (``training.packing``, the default): each epoch the shuffled conversations are bin-packed (best-fit
decreasing) into rows of ``pack_length`` tokens, the rows are shuffled and ``rows_per_step`` of them make one
optimizer step, so compute goes to real tokens and every step has the same shape (what ``torch.compile`` wants).
Packing never lets a token see another conversation: position ids restart at 0 for every conversation and the
attention is restricted to each conversation -- by a flex-attention ``BlockMask`` on CUDA, by one causal SDPA call
per conversation on CPU (``varlen_sdpa``, found from the position ids), or by a 4D boolean block-diagonal mask
(``sdpa``/``eager``) or varlen flash attention when configured. The first token of every conversation carries no
label, so the last token of one conversation is never trained to predict the next one; the loss is therefore the
per-token loss of the same conversations trained unpacked. With ``packing=false`` batches are length-grouped and
padded per batch only.

Everything that decides the batch order is seeded, so a run resumed from a checkpoint sees exactly the batches an
uninterrupted run would.
"""

from __future__ import annotations

import bisect
import logging
import math
import random
import time
from dataclasses import asdict, dataclass, field

from tasks.errors import StepError

log = logging.getLogger("tasks.ml.training")
IGNORE = -100
PACK_WINDOW = 4096  # conversations bin-packed together before the rows are shuffled
GPU_PACK_LENGTH = 2048  # training.pack_length=0 on CUDA
CPU_PACK_LENGTH = 512  # on CPU: the block-diagonal mask is dense there, so short rows waste less attention work
COMPILE_MIN_STEPS = 50  # even per layer the compile costs seconds; shorter runs (HPO trials) do not earn it back


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]

    @property
    def n_label(self) -> int:
        return sum(1 for x in self.labels if x != IGNORE)


@dataclass
class TrainState:
    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    tokens: int = 0  # real (non-padding) tokens trained on
    losses: list = field(default_factory=list)  # (step, loss, lr)
    val_loss_before: float | None = None  # validation loss of the untouched base, measured once at step 0
    slots: int = 0  # token slots computed (real + padding)

    def to_dict(self) -> dict:
        return asdict(self)


def encode(tokenizer, messages: list[dict], max_len: int, add_bos: bool | None = None) -> Example | None:
    """Tokenize one conversation; label only the assistant answer (and its end-of-turn token).

    The prompt part gets exactly the ids generation and the chat service feed the model (``generation.with_bos``:
    special tokens come from the chat template, plus the tokenizer's BOS unless the template wrote one)."""
    from tasks.ml.generation import with_bos

    prompt = tokenizer.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True)
    full = tokenizer.apply_chat_template(messages, tokenize=False)
    if not full.startswith(prompt):
        raise StepError("the chat template does not render the prompt as a prefix of the conversation; "
                        "cannot tell assistant tokens from the rest")
    answer_end = full.find(tokenizer.eos_token, len(prompt))
    answer_end = len(full) if answer_end < 0 else answer_end + len(tokenizer.eos_token)
    enc = tokenizer(full, return_offsets_mapping=True, add_special_tokens=False)
    ids = with_bos(tokenizer, enc["input_ids"], add_bos)
    offsets = [(-1, -1)] * (len(ids) - len(enc["input_ids"])) + list(enc["offset_mapping"])  # BOS: not a label
    ids, offsets = ids[:max_len], offsets[:max_len]
    labels = [tok if len(prompt) <= start < answer_end else IGNORE
              for tok, (start, end) in zip(ids, offsets, strict=True)]
    ex = Example(ids, labels)
    return ex if ex.n_label else None


def encode_all(tokenizer, records: list[dict], max_len: int) -> list[Example]:
    from tasks.ml.generation import adds_bos

    add_bos = adds_bos(tokenizer)
    examples = [encode(tokenizer, r["messages"], max_len, add_bos) for r in records]
    kept = [e for e in examples if e is not None]
    if len(kept) < len(examples):
        log.warning("%d conversation(s) had no answer tokens left after truncation to %d tokens; skipped",
                    len(examples) - len(kept), max_len)
    return kept


# --- batching -------------------------------------------------------------------------------------------------


def epoch_batches(examples: list[Example], batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """Length-grouped batches: shuffle, sort within windows of 64 batches, shuffle the batch order."""
    rng = random.Random(f"{seed}:{epoch}")
    order = list(range(len(examples)))
    rng.shuffle(order)
    window = batch_size * 64
    batches = []
    for i in range(0, len(order), window):
        chunk = sorted(order[i:i + window], key=lambda j: len(examples[j].input_ids))
        batches += [chunk[k:k + batch_size] for k in range(0, len(chunk), batch_size)]
    rng.shuffle(batches)
    return batches


def pack_rows(lengths: list[int], capacity: int) -> list[list[int]]:
    """Best-fit decreasing bin packing: indices of ``lengths`` grouped into rows of at most ``capacity`` tokens."""
    rows: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (space left, row), sorted
    for i in sorted(range(len(lengths)), key=lambda j: (-lengths[j], j)):
        n = lengths[i]
        if n > capacity:
            raise ValueError(f"a sequence of {n} tokens does not fit a row of {capacity}")
        k = bisect.bisect_left(free, (n, -1))
        if k < len(free):
            space, row = free.pop(k)
        else:
            space, row = capacity, len(rows)
            rows.append([])
        rows[row].append(i)
        if space > n:
            bisect.insort(free, (space - n, row))
    return rows


@dataclass
class Batching:
    """How the training set becomes optimizer steps; each step is a list of rows of example indices."""
    packing: bool
    batch_size: int
    pack_length: int = 0  # row width in tokens (packing)
    rows_per_step: int = 0  # rows per optimizer step (packing)

    def epoch(self, examples: list[Example], seed: int, epoch: int) -> list[list[list[int]]]:
        if not self.packing:
            return [[[i] for i in b] for b in epoch_batches(examples, self.batch_size, seed, epoch)]
        rng = random.Random(f"{seed}:{epoch}")
        order = list(range(len(examples)))
        rng.shuffle(order)
        rows: list[list[int]] = []
        for i in range(0, len(order), PACK_WINDOW):
            window = order[i:i + PACK_WINDOW]
            rows += [[window[j] for j in row]
                     for row in pack_rows([len(examples[j].input_ids) for j in window], self.pack_length)]
        rng.shuffle(rows)
        return [rows[k:k + self.rows_per_step] for k in range(0, len(rows), self.rows_per_step)]

    def describe(self) -> str:
        if not self.packing:
            return f"length-grouped batches of {self.batch_size} conversations, padded per batch"
        return (f"packed rows: {self.rows_per_step} x {self.pack_length} tokens per step (~{self.batch_size} "
                f"conversations), attention and positions per conversation")


def plan_batching(examples: list[Example], tcfg, device) -> Batching:
    """Row width and rows per step for this training set: the width is training.pack_length (0 = auto, by device)
    raised to the longest conversation; rows per step keep ~training.batch_size conversations per step."""
    if not tcfg.packing:
        return Batching(False, tcfg.batch_size)
    if not examples:
        raise StepError("no training conversations to pack")
    lengths = [len(e.input_ids) for e in examples]
    want = tcfg.pack_length or (GPU_PACK_LENGTH if str(device).startswith("cuda") else CPU_PACK_LENGTH)
    width = max(want, -(-max(lengths) // 64) * 64)
    rows = max(1, round(tcfg.batch_size * (sum(lengths) / len(lengths)) / width))
    return Batching(True, tcfg.batch_size, width, rows)


def collate(examples: list[Example], idx: list[int], pad_id: int, device):
    """Right-padded batch of the given examples: (input_ids, attention_mask, labels)."""
    import torch

    width = max(len(examples[i].input_ids) for i in idx)
    ids = torch.full((len(idx), width), pad_id, dtype=torch.long)
    labels = torch.full((len(idx), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(idx), width), dtype=torch.long)
    for row, i in enumerate(idx):
        n = len(examples[i].input_ids)
        ids[row, :n] = torch.tensor(examples[i].input_ids)
        labels[row, :n] = torch.tensor(examples[i].labels)
        mask[row, :n] = 1
    if str(device).startswith("cuda"):  # a copy from pageable memory would wait for the GPU's queued work
        return tuple(t.pin_memory().to(device, non_blocking=True) for t in (ids, mask, labels))
    return ids.to(device), mask.to(device), labels.to(device)


def collate_packed(examples: list[Example], rows: list[list[int]], n_rows: int, width: int, pad_id: int):
    """Rows of concatenated conversations (CPU tensors): input_ids, labels, position_ids (restarting at 0 for every
    conversation) and seq_ids (which conversation of its row a token belongs to). The first token of each
    conversation gets no label; tail padding is a label-less segment of its own; rows beyond ``rows`` are padding."""
    import torch

    ids = torch.full((n_rows, width), pad_id, dtype=torch.long)
    labels = torch.full((n_rows, width), IGNORE, dtype=torch.long)
    pos = torch.arange(width, dtype=torch.long).repeat(n_rows, 1)
    seq = torch.zeros((n_rows, width), dtype=torch.long)
    for r, row in enumerate(rows):
        at = 0
        for s, i in enumerate(row):
            ex = examples[i]
            n = len(ex.input_ids)
            if at + n > width:
                raise ValueError(f"row {r} holds {at + n} tokens, more than its width {width}")
            ids[r, at:at + n] = torch.tensor(ex.input_ids)
            labels[r, at + 1:at + n] = torch.tensor(ex.labels[1:])  # nothing predicts a conversation's 1st token
            pos[r, at:at + n] = torch.arange(n)
            seq[r, at:at + n] = s
            at += n
        pos[r, at:] = torch.arange(width - at)
        seq[r, at:] = len(row)
    return {"input_ids": ids, "labels": labels, "position_ids": pos, "seq_ids": seq}


VARLEN = "ecb_varlen_sdpa"  # name under which varlen_sdpa_attention is registered with transformers


def varlen_sdpa_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None,
                          position_ids=None, **kwargs):
    """Attention for packed rows without a mask: one causal SDPA call per conversation, found from the position
    ids (a conversation starts where its position is 0). Work is the sum of the conversations' own causal
    attention, not rows x width^2 as with a dense block-diagonal mask. Anything else (a padding mask, a KV cache,
    one conversation per row) goes to transformers' own SDPA attention."""
    import torch
    import torch.nn.functional as F
    from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward

    b, h, n, d = query.shape
    starts = None
    if attention_mask is None and position_ids is not None and n > 1 and key.shape[2] == n:
        starts = position_ids.expand(b, -1) == 0
        starts[:, 0] = True
    if starts is None or int(starts.sum()) == b:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    groups = getattr(module, "num_key_value_groups", 1)
    key, value = repeat_kv(key, groups), repeat_kv(value, groups)
    bounds = starts.flatten().nonzero().flatten().tolist() + [b * n]
    sizes = [hi - lo for lo, hi in zip(bounds, bounds[1:], strict=False)]

    def segments(t):  # (b, h, n, d) -> the conversations along one flattened sequence axis (split: cheap backward)
        return torch.split(t.transpose(0, 1).reshape(1, h, b * n, d), sizes, dim=2)

    p = dropout if module.training else 0.0
    parts = [F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=True, scale=scaling)
             for q, k, v in zip(segments(query), segments(key), segments(value), strict=True)]
    return torch.cat(parts, dim=2).view(h, b, n, d).permute(1, 2, 0, 3).contiguous(), None


def _varlen_mask(*args, attention_mask=None, **kwargs):
    """Mask builder for VARLEN: none for packed rows (the attention finds the conversations), SDPA's otherwise."""
    from transformers.masking_utils import sdpa_mask

    return None if attention_mask is None else sdpa_mask(*args, attention_mask=attention_mask, **kwargs)


def register_varlen_attention() -> str:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(VARLEN, varlen_sdpa_attention)
    AttentionMaskInterface.register(VARLEN, _varlen_mask)
    return VARLEN


def packed_attention_mask(seq_ids, impl: str, dtype=None):
    """Causal attention restricted to each token's own conversation (seq_ids: batch x length)."""
    import torch

    b, n = seq_ids.shape
    if impl == "flex_attention":
        from torch.nn.attention.flex_attention import create_block_mask

        def same_conversation(batch, head, q, kv, seq=seq_ids):  # seq as a default, as in the measured probes
            return (q >= kv) & (seq[batch, q] == seq[batch, kv])

        return create_block_mask(same_conversation, b, None, n, n, device=seq_ids.device)
    causal = torch.ones((n, n), dtype=torch.bool, device=seq_ids.device).tril()
    mask = (causal[None] & (seq_ids[:, :, None] == seq_ids[:, None, :]))[:, None]
    if impl == "sdpa":
        return mask
    if impl == "eager":  # additive
        dtype = dtype or torch.float32
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, torch.finfo(dtype).min)
    raise StepError(f"packed training does not support attention implementation {impl!r}")


def packed_inputs(batch: dict, impl: str, device, dtype=None) -> dict:
    """Model keyword arguments for a packed batch from ``collate_packed`` under attention kernel ``impl``."""
    # non_blocking: from pinned memory (fit on CUDA) the copies are queued behind the running step, not waited for
    ids, labels, pos = (batch[k].to(device, non_blocking=True) for k in ("input_ids", "labels", "position_ids"))
    if impl in ("varlen_sdpa", VARLEN):  # the attention finds the conversations from the position ids
        return {"input_ids": ids, "labels": labels, "position_ids": pos}
    if impl.startswith("flash_attention"):  # varlen kernels find the conversations from the position ids
        return {"input_ids": ids.view(1, -1), "labels": labels.view(1, -1), "position_ids": pos.view(1, -1)}
    mask = packed_attention_mask(batch["seq_ids"].to(device, non_blocking=True), impl, dtype)
    return {"input_ids": ids, "labels": labels, "position_ids": pos, "attention_mask": mask}


def packed_attention_impl(tcfg, model, device) -> str:
    """training.packed_attention; auto = a flex-attention BlockMask on CUDA, else varlen SDPA (one causal SDPA
    call per conversation, no mask)."""
    choice = tcfg.packed_attention
    cuda = str(device).startswith("cuda")
    if choice == "auto":
        choice = "flex_attention" if cuda and _flex_available() else "varlen_sdpa"
    elif choice in ("flex_attention", "flash_attention_2") and not cuda:
        log.warning("training.packed_attention=%s needs CUDA (no backward on CPU); using varlen_sdpa", choice)
        choice = "varlen_sdpa"
    return choice


def _flex_available() -> bool:
    try:
        from torch.nn.attention.flex_attention import create_block_mask  # noqa: F401
    except ImportError:
        return False
    return True


def _set_attn_implementation(model, impl: str | None):
    """Switch the model's attention kernel for training; returns a function that switches it back."""
    if impl is None:
        return lambda: None
    if impl == "varlen_sdpa":
        impl = register_varlen_attention()
    before = model.config._attn_implementation
    if before == impl:
        return lambda: None
    target = model.get_base_model() if hasattr(model, "get_base_model") else model
    target.set_attn_implementation(impl)
    log.info("attention kernel for packed training: %s (model loaded with %s)", impl, before)
    return lambda: target.set_attn_implementation(before)


# --- optimisation ---------------------------------------------------------------------------------------------


def steps_per_epoch(examples: list[Example], tcfg, device) -> int:
    return len(plan_batching(examples, tcfg, device).epoch(examples, tcfg.seed, 0))


def total_steps(n_examples: int, tcfg, per_epoch: int | None = None) -> int:
    """training.max_steps, else epochs x steps per epoch (given, or one step per batch_size conversations)."""
    per_epoch = per_epoch or math.ceil(n_examples / tcfg.batch_size)
    return tcfg.max_steps or max(1, math.ceil(per_epoch * tcfg.epochs))


def make_optimizer(model, tcfg, steps: int):
    import torch

    params = [p for p in model.parameters() if p.requires_grad]
    fused = bool(params) and all(p.is_cuda for p in params)  # one kernel per step instead of one per tensor
    opt = torch.optim.AdamW(params, lr=tcfg.learning_rate, weight_decay=tcfg.weight_decay, fused=fused or None)
    warmup = int(steps * tcfg.warmup_ratio)

    def lr_lambda(step: int) -> float:  # linear warm-up, then linear decay to 10% of the peak
        if step < warmup:
            return (step + 1) / warmup
        return max(0.1, 1.0 - 0.9 * (step - warmup) / max(1, steps - warmup))

    return opt, torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda)


def device_and_dtype(tcfg):
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if tcfg.dtype == "auto":
        dtype = torch.bfloat16 if device == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
    else:
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[tcfg.dtype]
    return device, dtype


def validation_loss(model, examples: list[Example], batch_size: int, max_batches: int, pad_id: int, device) -> float:
    """Token-weighted mean loss over the first max_batches length-sorted batches (deterministic)."""
    import torch

    idx = sorted(range(len(examples)), key=lambda i: len(examples[i].input_ids))
    batches = [idx[k:k + batch_size] for k in range(0, len(idx), batch_size)][:max_batches]
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    with torch.inference_mode():
        for b in batches:
            ids, mask, labels = collate(examples, b, pad_id, device)
            n = int((labels[:, 1:] != IGNORE).sum())
            total += float(labelled_loss(model, {"input_ids": ids, "attention_mask": mask, "labels": labels})) * n
            count += n
    model.train(was_training)
    return total / max(count, 1)


class LossLog:
    """The per-step losses of a fit, kept on the device and read in one transfer when somebody looks (a progress
    line, a checkpoint, a pruning report, the end of fit). Reading each step's loss (``.item()``) would make the CPU
    wait for the GPU at every step, so it could not prepare the next batch (and its BlockMask) while the GPU works."""

    def __init__(self, state: TrainState):
        self.state, self.pending = state, []

    def add(self, step: int, loss, lr: float) -> None:
        self.pending.append((step, loss.detach(), lr))

    def flush(self) -> float | None:
        """Move the pending losses into ``state.losses`` (one device sync); returns the latest loss."""
        if self.pending:
            import torch

            values = torch.stack([loss.float() for _, loss, _ in self.pending]).tolist()
            self.state.losses += [(step, value, lr) for (step, _, lr), value in zip(self.pending, values, strict=True)]
            self.pending.clear()
        return self.state.losses[-1][1] if self.state.losses else None


class Progress:
    """A progress line at most every `every_s` seconds: step, loss, lr, tokens/s, ETA (the loss is read then)."""

    def __init__(self, total: int, every_s: float, start_step: int):
        self.total, self.every_s = total, every_s
        self.t0 = self.last = time.monotonic()
        self.start_step, self.tokens = start_step, 0

    def update(self, state: TrainState, losses: LossLog, lr: float, tokens: int, force: bool = False) -> None:
        self.tokens += tokens
        now = time.monotonic()
        if not force and now - self.last < self.every_s:
            return
        loss = losses.flush()
        now = time.monotonic()  # after the wait for the device: the rate counts the work queued so far
        self.last = now
        done = state.step - self.start_step
        rate = self.tokens / max(now - self.t0, 1e-9)
        eta = (self.total - state.step) * (now - self.t0) / max(done, 1)
        log.info("step %d/%d  loss %.4f  lr %.2e  %.0f tokens/s  ETA %s", state.step, self.total, loss, lr, rate,
                 time.strftime("%H:%M:%S", time.gmtime(eta)))


def decoder_layers(model) -> list:
    """The repeated transformer blocks of a causal LM, PEFT-wrapped or not (``model.model.layers``)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    layers = getattr(getattr(base, "model", None), "layers", None)
    return list(layers) if layers is not None else []


class RegionalCompile:
    """torch.compile per decoder layer (regional compilation) for the training steps, when training.compile is on,
    on CUDA, for packed batches (a fixed shape; padded batches change width every step and each width would
    recompile) and runs of >= COMPILE_MIN_STEPS steps. The layers are
    identical, so the compiled code of one serves them all (the embeddings' output is made to require grad like
    every later layer's input, else the first layer would get a graph of its own): the compile costs about one
    layer's instead of the whole model's, and the time of a step is in the layers anyway. ``nn.Module.compile`` keeps
    parameter names, so checkpoints and adapters are unchanged. If the first compiled step fails, the layers go
    back to eager and the step is redone (logged); a later failure is a real error."""

    def __init__(self, model, tcfg, device, steps_left: int, packing: bool):
        self.model, self.layers, self.proven, self._hook = model, [], False, None
        reason = self._skip_reason(tcfg, device, steps_left, packing)
        if reason:
            if tcfg.compile and str(device).startswith("cuda"):
                log.info("training.compile: not compiling, %s", reason)
            return
        import torch

        self.layers = decoder_layers(model)
        if not self.layers:
            log.info("training.compile: no decoder layers found (model.model.layers); training eagerly")
            return
        embeddings = model.get_input_embeddings()
        self._hook = embeddings.register_forward_hook(
            lambda module, args, out: out.requires_grad_(True) if torch.is_grad_enabled() else out)
        for layer in self.layers:
            layer.compile()
        log.info("training.compile: %d decoder layers compiled one by one (regional torch.compile; the first step "
                 "includes the compilation)", len(self.layers))

    @staticmethod
    def _skip_reason(tcfg, device, steps_left: int, packing: bool) -> str | None:
        if not tcfg.compile:
            return "training.compile=false"
        if not str(device).startswith("cuda"):
            return "not on CUDA"
        if not packing:
            return "padded batches (training.packing=false) change shape every step; each shape would recompile"
        if steps_left < COMPILE_MIN_STEPS:
            return f"{steps_left} steps to train is fewer than {COMPILE_MIN_STEPS}: the compile would not pay"
        return None

    def step(self, forward_backward):
        """Run one forward + backward (``forward_backward()`` returns the loss), eagerly again if compiling fails."""
        if not self.layers or self.proven:
            return forward_backward()
        try:
            loss = forward_backward()
        except Exception as exc:  # noqa: BLE001 -- any compiler failure: eager is correct, only slower
            log.warning("torch.compile failed (%s); training continues without it", str(exc).splitlines()[0][:300])
            self.undo()
            self.model.zero_grad(set_to_none=True)  # whatever a half-done backward left
            return forward_backward()
        self.proven = True
        return loss

    def undo(self) -> None:
        """Back to eager layers (nn.Module.compile keeps the compiled call in ``_compiled_call_impl``)."""
        for layer in self.layers:
            layer._compiled_call_impl = None
        self.layers = []
        if self._hook is not None:
            self._hook.remove()
            self._hook = None


def fit(model, train: list[Example], tcfg, steps: int, state: TrainState, opt, sched, *, pad_id: int, device,
        dtype, on_step=None) -> TrainState:
    """Train until state.step == steps. on_step(state, losses) runs after every optimizer step (checkpoints,
    pruning reports); it may return True to stop early. ``losses`` is the fit's LossLog: ``losses.flush()`` puts
    the losses so far into state.losses (a device sync: only when needed, e.g. before a checkpoint). fit returns
    with every step's loss in state.losses."""
    import torch

    batching = plan_batching(train, tcfg, device)
    impl = packed_attention_impl(tcfg, model, device) if batching.packing else None
    restore = _set_attn_implementation(model, impl)
    compiled, losses = None, LossLog(state)
    cuda = str(device).startswith("cuda")
    try:
        compiled = RegionalCompile(model, tcfg, device, steps - state.step, batching.packing)
        model.train()
        log.info("batches: %s", batching.describe())
        progress = Progress(steps, tcfg.log_every_s, state.step)
        autocast = torch.autocast(device_type=str(device).split(":")[0], dtype=dtype, enabled=dtype != torch.float32)
        casts = NoInputCasts(model, enabled=dtype != torch.float32)
        while state.step < steps:
            for rows in batching.epoch(train, tcfg.seed, state.epoch)[state.batch_in_epoch:]:
                # Token counts come from the CPU-side lists: reading a device tensor would wait for the GPU.
                n_tokens = sum(len(train[i].input_ids) for row in rows for i in row)
                if batching.packing:
                    batch = collate_packed(train, rows, batching.rows_per_step, batching.pack_length, pad_id)
                    if cuda:  # pinned: the copies below return at once and overlap the step still running
                        batch = {k: v.pin_memory() for k, v in batch.items()}
                    n_slots = batch["input_ids"].numel()
                    inputs = packed_inputs(batch, impl, device, dtype)
                else:
                    ids, mask, labels = collate(train, [r[0] for r in rows], pad_id, device)
                    n_slots = ids.numel()
                    inputs = {"input_ids": ids, "attention_mask": mask, "labels": labels}
                loss = compiled.step(lambda inputs=inputs: _forward_backward(model, inputs, autocast, casts))
                opt.step()
                sched.step()
                opt.zero_grad(set_to_none=True)
                state.step += 1
                state.batch_in_epoch += 1
                state.tokens += n_tokens
                state.slots += n_slots
                lr = sched.get_last_lr()[0]
                losses.add(state.step, loss, lr)
                progress.update(state, losses, lr, n_tokens, force=state.step == steps)
                if (on_step and on_step(state, losses)) or state.step >= steps:
                    return state
            state.epoch += 1
            state.batch_in_epoch = 0
        return state
    finally:
        losses.flush()
        if compiled is not None:  # the model leaves fit as it came (eager layers for evaluation and saving)
            compiled.undo()
        restore()


def _forward_backward(model, inputs: dict, autocast, casts):
    with casts:  # the backward too: gradient checkpointing runs the forward again there
        with autocast:
            loss = labelled_loss(model, inputs)
        loss.backward()
    return loss


class NoInputCasts:
    """peft casts each LoRA module's input to the adapter's dtype (fp32) before the adapter. Under bf16/fp16
    autocast that cast is pure cost: a full fp32 copy of every adapted projection's input (kept for the backward
    when LoRA dropout is on) that autocast turns back into bf16 for the adapter's matmul. fit's forward runs with
    the casts off; anything else (validation, generation without autocast) keeps peft's casts."""

    def __init__(self, model, enabled: bool):
        from peft.tuners.tuners_utils import BaseTunerLayer

        self.layers = [m for m in model.modules() if isinstance(m, BaseTunerLayer)] if enabled else []

    def __enter__(self):
        for layer in self.layers:
            layer.cast_input_dtype_enabled = False

    def __exit__(self, *exc):
        for layer in self.layers:
            layer.cast_input_dtype_enabled = True


def _decoder_and_head(model):
    """(decoder, output head) of a causal LM whose logits are ``head(decoder(...).last_hidden_state)`` and nothing
    more, PEFT-wrapped or not; None for heads that scale or cap their logits (Gemma 2, Granite, ...)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    cfg = base.config
    if getattr(cfg, "final_logit_softcapping", None) or getattr(cfg, "logits_scaling", 1.0) not in (None, 1, 1.0):
        return None
    decoder, head = getattr(base, "model", None), base.get_output_embeddings()
    return (decoder, head) if decoder is not None and head is not None else None


def labelled_loss(model, inputs: dict):
    """The model's own causal-LM loss (mean next-token cross-entropy over the labelled positions), with the output
    head applied to the labelled positions only. Only assistant tokens carry labels, so the vocabulary-wide logits
    of every prompt and padding position (most of a row; 2048 x 32,000 floats per TinyLlama row) are never made.
    Falls back to ``model(**inputs).loss`` for heads it does not know."""
    import torch

    parts = _decoder_and_head(model)
    if parts is None:
        return model(**inputs).loss
    decoder, head = parts
    labels = inputs["labels"]
    hidden = decoder(**{k: v for k, v in inputs.items() if k != "labels"}, use_cache=False).last_hidden_state
    target = labels[:, 1:]
    keep = target != IGNORE
    logits = head(hidden[:, :-1][keep]).float()  # the model's loss upcasts its logits the same way
    return torch.nn.functional.cross_entropy(logits, target[keep])
