"""The seed recipe: how the project this one replaces fine-tuned and evaluated (the reference of every ratio).

Fine-tune: fp32 weights, fp16 autocast with a GradScaler (CUDA; on CPU plain fp32), gradient checkpointing, batch 4
with every sample padded (or cut) to 512 tokens, LoRA r=16 alpha=32 dropout 0.05 on all seven projections, AdamW
lr 5e-4. Evaluate: one example at a time, the prompt right-padded to 512, sampled decoding (temperature 0.8), 150
new tokens, adapter not merged. This is deliberately *not* the project's code: it is what the project is measured
against (see ../shared/anchors/seed_vs_fast.py for the scripts that measured the issue's reference table).
"""

from __future__ import annotations

import random

from bench.common import VAL_BATCHES, now

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SEED_LEN, SEED_BATCH, SEED_LR = 512, 4, 5e-4


def load_seed_model(model_dir: str, device: str):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(device)
    model.config.use_cache = False
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    torch.manual_seed(0)
    lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules=TARGETS, task_type="CAUSAL_LM")
    return get_peft_model(model, lora)


def seed_batches(examples, n_batches: int, pad_id: int, seed: int = 0):
    """Batches of 4 in a seeded shuffled order, each sample padded/cut to 512: (ids, mask, labels, real tokens)."""
    import torch

    from tasks.ml.training import IGNORE

    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    out = []
    for b in range(n_batches):
        idx = [order[(b * SEED_BATCH + j) % len(order)] for j in range(SEED_BATCH)]
        ids = torch.full((SEED_BATCH, SEED_LEN), pad_id, dtype=torch.long)
        labels = torch.full((SEED_BATCH, SEED_LEN), IGNORE, dtype=torch.long)
        mask = torch.zeros((SEED_BATCH, SEED_LEN), dtype=torch.long)
        real = 0
        for row, i in enumerate(idx):
            n = min(SEED_LEN, len(examples[i].input_ids))
            ids[row, :n] = torch.tensor(examples[i].input_ids[:n])
            labels[row, :n] = torch.tensor(examples[i].labels[:n])
            mask[row, :n] = 1
            real += n
        out.append((ids, mask, labels, real))
    return out


class SeedTrain:
    """The seed fine-tune loop, one optimizer step per call of run_to (so recipes can be timed interleaved)."""

    def __init__(self, model_dir: str, examples, val, *, device: str, pad_id: int, total_steps: int):
        import torch

        self.device, self.pad_id, self.val = device, pad_id, val
        self.model = load_seed_model(model_dir, device)
        self.model.train()
        self.opt = torch.optim.AdamW([p for p in self.model.parameters() if p.requires_grad], lr=SEED_LR)
        self.scaler = torch.amp.GradScaler("cuda") if device == "cuda" else None
        self.batches = seed_batches(examples, total_steps, pad_id)
        self.step, self.tokens, self.slots, self.loss = 0, 0, 0, float("nan")

    def run_to(self, step: int) -> None:
        import torch

        amp = torch.autocast(device_type=self.device, dtype=torch.float16, enabled=self.device == "cuda")
        while self.step < step:
            ids, mask, labels, n_real = self.batches[self.step % len(self.batches)]
            ids, mask, labels = ids.to(self.device), mask.to(self.device), labels.to(self.device)
            with amp:
                loss = self.model(input_ids=ids, attention_mask=mask, labels=labels).loss
            if self.scaler is not None:
                self.scaler.scale(loss).backward()
                self.scaler.step(self.opt)
                self.scaler.update()
            else:
                loss.backward()
                self.opt.step()
            self.opt.zero_grad(set_to_none=True)
            self.loss = loss.item()
            self.step += 1
            self.tokens += n_real
            self.slots += ids.numel()

    def val_loss(self) -> float:
        from tasks.ml.training import validation_loss

        return validation_loss(self.model, self.val, 8, VAL_BATCHES, self.pad_id, self.device)

    conversations_per_step = SEED_BATCH
    description = "4 x 512 padded"


def seed_eval(model, tokenizer, prompts: list[str], device: str, new_tokens: int = 150, seed: int = 0) -> dict:
    """The seed evaluation loop on an unmerged peft model: one prompt at a time, right-padded to 512 tokens,
    sampled at temperature 0.8, `new_tokens` new tokens each."""
    import torch

    from tasks.ml.generation import _pad_id, encode_prompts

    if not prompts:
        return {"examples": 0, "seconds": 0.0, "new_tokens": 0}
    pad = _pad_id(tokenizer)
    model.eval()
    torch.manual_seed(seed)
    generated = 0
    t0 = now(device)
    with torch.inference_mode():
        for ids in encode_prompts(tokenizer, prompts):
            ids = ids[:SEED_LEN]
            x = torch.full((1, SEED_LEN), pad, dtype=torch.long)
            x[0, :len(ids)] = torch.tensor(ids)
            mask = (torch.arange(SEED_LEN) < len(ids)).long()[None]
            out = model.generate(input_ids=x.to(device), attention_mask=mask.to(device), max_new_tokens=new_tokens,
                                 min_new_tokens=new_tokens, do_sample=True, temperature=0.8, pad_token_id=pad)
            generated += out.shape[1] - SEED_LEN
    seconds = now(device) - t0
    return {"examples": len(prompts), "seconds": seconds, "new_tokens": generated}
