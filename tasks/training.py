"""LoRA training machinery shared by the fine-tune step and the HPO trials (litgpt style: setup -> fit).

Conversations are rendered with the tokenizer's own chat template; only assistant tokens carry labels. Batches
are length-grouped and padded per batch only, so compute goes to real tokens. Everything that decides the batch
order is seeded, so a run resumed from a checkpoint sees exactly the batches an uninterrupted run would.
"""

from __future__ import annotations

import logging
import math
import random
import time
from dataclasses import asdict, dataclass, field

from tasks.runner import StepError

log = logging.getLogger("tasks.training")
IGNORE = -100


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
    tokens: int = 0
    losses: list = field(default_factory=list)  # (step, loss, lr)
    val_loss_before: float | None = None  # validation loss of the untouched base, measured once at step 0

    def to_dict(self) -> dict:
        return asdict(self)


def encode(tokenizer, messages: list[dict], max_len: int) -> Example | None:
    """Tokenize one conversation; label only the assistant answer (and its end-of-turn token)."""
    prompt = tokenizer.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True)
    full = tokenizer.apply_chat_template(messages, tokenize=False)
    if not full.startswith(prompt):
        raise StepError("the chat template does not render the prompt as a prefix of the conversation; "
                        "cannot tell assistant tokens from the rest")
    answer_end = full.find(tokenizer.eos_token, len(prompt))
    answer_end = len(full) if answer_end < 0 else answer_end + len(tokenizer.eos_token)
    enc = tokenizer(full, return_offsets_mapping=True, truncation=True, max_length=max_len)
    labels = [tok if len(prompt) <= start < answer_end else IGNORE
              for tok, (start, end) in zip(enc["input_ids"], enc["offset_mapping"], strict=True)]
    ex = Example(list(enc["input_ids"]), labels)
    return ex if ex.n_label else None


def encode_all(tokenizer, records: list[dict], max_len: int) -> list[Example]:
    examples = [encode(tokenizer, r["messages"], max_len) for r in records]
    kept = [e for e in examples if e is not None]
    if len(kept) < len(examples):
        log.warning("%d conversation(s) had no answer tokens left after truncation to %d tokens; skipped",
                    len(examples) - len(kept), max_len)
    return kept


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


def collate(examples: list[Example], idx: list[int], pad_id: int, device):
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
    return ids.to(device), mask.to(device), labels.to(device)


def total_steps(n_examples: int, tcfg) -> int:
    per_epoch = math.ceil(n_examples / tcfg.batch_size)
    return tcfg.max_steps or max(1, math.ceil(per_epoch * tcfg.epochs))


def make_optimizer(model, tcfg, steps: int):
    import torch

    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=tcfg.learning_rate, weight_decay=tcfg.weight_decay)
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
            total += float(model(input_ids=ids, attention_mask=mask, labels=labels).loss) * n
            count += n
    model.train(was_training)
    return total / max(count, 1)


class Progress:
    """A progress line at most every `every_s` seconds: step, loss, lr, tokens/s, ETA."""

    def __init__(self, total: int, every_s: float, start_step: int):
        self.total, self.every_s = total, every_s
        self.t0 = self.last = time.monotonic()
        self.start_step, self.tokens = start_step, 0

    def update(self, state: TrainState, loss: float, lr: float, tokens: int, force: bool = False) -> None:
        self.tokens += tokens
        now = time.monotonic()
        if not force and now - self.last < self.every_s:
            return
        self.last = now
        done = state.step - self.start_step
        rate = self.tokens / max(now - self.t0, 1e-9)
        eta = (self.total - state.step) * (now - self.t0) / max(done, 1)
        log.info("step %d/%d  loss %.4f  lr %.2e  %.0f tokens/s  ETA %s", state.step, self.total, loss, lr, rate,
                 time.strftime("%H:%M:%S", time.gmtime(eta)))


def fit(model, train: list[Example], tcfg, steps: int, state: TrainState, opt, sched, *, pad_id: int, device,
        dtype, on_step=None) -> TrainState:
    """Train until state.step == steps. on_step(state, loss) runs after every optimizer step (checkpoints,
    pruning reports); it may return True to stop early."""
    import torch

    model.train()
    progress = Progress(steps, tcfg.log_every_s, state.step)
    autocast = torch.autocast(device_type=device, dtype=dtype, enabled=dtype != torch.float32)
    while state.step < steps:
        batches = epoch_batches(train, tcfg.batch_size, tcfg.seed, state.epoch)
        for b in batches[state.batch_in_epoch:]:
            ids, mask, labels = collate(train, b, pad_id, device)
            with autocast:
                loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
            loss.backward()
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            state.step += 1
            state.batch_in_epoch += 1
            n_tokens = int(mask.sum())
            state.tokens += n_tokens
            lr, value = sched.get_last_lr()[0], loss.detach().item()
            state.losses.append((state.step, value, lr))
            progress.update(state, value, lr, n_tokens, force=state.step == steps)
            if (on_step and on_step(state, value)) or state.step >= steps:
                return state
        state.epoch += 1
        state.batch_in_epoch = 0
    return state
