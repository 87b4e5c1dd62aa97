"""Build a small Llama-architecture chat *base* model locally, so the whole pipeline runs without the Hub.

    python -m tasks build_demo_model --input snapshot_uri=s3://ecb-platform/snapshots/<id>/ \
        [--input dest=s3://ecb-platform/models/base/demo-llama/] [--input size=demo|tiny] [--input steps=N] \
        [--input seed=0]

then train on it with ``--set model.base_model=<base_model_uri from the manifest>``. Without S3 (a quick local
look, from the synthetic generator):

    python -m tasks.demo.model --out /tmp/demo-llama [--rows 2400] [--size demo]

The result is treated exactly like TinyLlama-1.1B-Chat-v1.0: a ``LlamaForCausalLM`` (RMSNorm, RoPE, SwiGLU,
grouped-query attention with 2 KV heads, untied embeddings) saved as safetensors, and a byte-level BPE tokenizer
with Llama's special ids (``<unk>``=0, ``<s>``=1, ``</s>``=2; ``<s>`` is prepended like Llama's tokenizer does),
the Zephyr markers ``<|system|>``, ``<|user|>``, ``<|assistant|>`` as added special tokens, and TinyLlama's chat
template verbatim. Pad is ``</s>``, as in TinyLlama-Chat: training code must therefore mask padding through the
attention mask, never by ``input_ids == pad_token_id`` (that would also hide the real end-of-turn ``</s>`` the
model has to learn).

It is only *pre*-trained, briefly, on the training split's instructions and responses as separate plain documents
(no chat template, shuffled so an instruction is not followed by its answer): it knows the vocabulary and style of
the shop's support texts but has not learnt to answer in the chat format -- that is the fine-tune's job.

Idempotent: the model folder is a pure function of (train.jsonl bytes, settings, seed, DEMO_VERSION). Its
fingerprint is stored in ``ecb_fingerprint.json`` beside the model (written last); when ``dest`` already holds a
model with the same fingerprint the step returns the stored manifest without building anything.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import math
import os
import sys
import time
from dataclasses import dataclass

log = logging.getLogger("tasks.demo.model")

DEMO_VERSION = "1"  # bump when code changes what a demo model contains (part of the fingerprint)
FINGERPRINT_FILE = "ecb_fingerprint.json"
SPECIAL_TOKENS = ("<unk>", "<s>", "</s>")  # ids 0, 1, 2 like Llama
UNK, BOS, EOS = SPECIAL_TOKENS
PAD = EOS  # like TinyLlama-Chat; see the module docstring
CHAT_MARKERS = ("<|system|>", "<|user|>", "<|assistant|>")
# TinyLlama/TinyLlama-1.1B-Chat-v1.0's chat template, verbatim (the double space before '+' included).
ZEPHYR_CHAT_TEMPLATE = (
    "{% for message in messages %}\n"
    "{% if message['role'] == 'user' %}\n"
    "{{ '<|user|>\n' + message['content'] + eos_token }}\n"
    "{% elif message['role'] == 'system' %}\n"
    "{{ '<|system|>\n' + message['content'] + eos_token }}\n"
    "{% elif message['role'] == 'assistant' %}\n"
    "{{ '<|assistant|>\n'  + message['content'] + eos_token }}\n"
    "{% endif %}\n"
    "{% if loop.last and add_generation_prompt %}\n"
    "{{ '<|assistant|>' }}\n"
    "{% endif %}\n"
    "{% endfor %}"
)


@dataclass(frozen=True)
class DemoSettings:
    """Architecture and pre-training settings; all of them are part of the fingerprint."""
    vocab_size: int = 4096  # BPE target; the real size is what the corpus supports (+3 chat markers)
    hidden_size: int = 192
    num_layers: int = 4
    num_heads: int = 6  # head_dim 32
    num_kv_heads: int = 2  # grouped-query attention, like TinyLlama (32 heads, 4 KV heads)
    intermediate_size: int = 528  # 2.75 x hidden, like TinyLlama (5632 / 2048)
    max_position_embeddings: int = 1024
    rope_theta: float = 10000.0
    seq_len: int = 128  # packed pre-training block length
    batch_size: int = 8
    steps: int = 120
    learning_rate: float = 3e-3
    warmup_steps: int = 12
    seed: int = 0


SIZES = {
    "demo": DemoSettings(),
    # for tests and smoke runs: seconds, not minutes
    "tiny": DemoSettings(vocab_size=512, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                         intermediate_size=176, max_position_embeddings=512, seq_len=64, batch_size=8, steps=30,
                         learning_rate=5e-3, warmup_steps=3),
}


def settings_for(size: str | DemoSettings = "demo", **overrides) -> DemoSettings:
    from tasks.errors import StepError

    if isinstance(size, DemoSettings):
        base = size
    elif size in SIZES:
        base = SIZES[size]
    else:
        raise StepError(f"build_demo_model: unknown size {size!r} (known: {', '.join(SIZES)})")
    settings = dataclasses.replace(base, **{k: v for k, v in overrides.items() if v is not None})
    if settings.steps < 1 or settings.batch_size < 1 or settings.seq_len < 2:
        raise StepError(f"build_demo_model: steps, batch_size must be >= 1 and seq_len >= 2, got {settings}")
    return settings


# --------------------------------------------------------------------------------------------------- tokenizer

def build_tokenizer(texts, vocab_size: int = 4096, model_max_length: int = 1024):
    """Byte-level BPE trained on ``texts`` -> ``PreTrainedTokenizerFast`` shaped like TinyLlama-Chat's tokenizer.

    Byte-level (ByteLevel pre-tokenizer without a prefix space + ByteLevel decoder) so every string -- placeholders
    such as ``{{Order Number}}``, emoji, newlines, double spaces -- decodes back exactly. ``<s>`` is prepended by
    the post-processor (Llama's ``add_bos_token``); the chat template itself adds no BOS, like TinyLlama's.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(list(texts), trainer=trainer)
    ids = [tok.token_to_id(t) for t in SPECIAL_TOKENS]
    if ids != [0, 1, 2]:
        raise RuntimeError(f"special tokens got ids {ids}, expected [0, 1, 2]")
    tok.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B",
                                                       special_tokens=[(BOS, 1)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS, unk_token=UNK,
                                   pad_token=PAD, model_max_length=model_max_length,
                                   clean_up_tokenization_spaces=False)
    fast.add_special_tokens({"additional_special_tokens": list(CHAT_MARKERS)})
    fast.chat_template = ZEPHYR_CHAT_TEMPLATE
    return fast


# --------------------------------------------------------------------------------------------------- model

def build_model(tokenizer, size: str | DemoSettings = "demo", **overrides):
    """A randomly initialised (seeded) ``LlamaForCausalLM`` sized by ``size`` with the tokenizer's vocabulary."""
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    s = settings_for(size, **overrides)
    bos, eos, pad = tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=s.hidden_size, intermediate_size=s.intermediate_size,
        num_hidden_layers=s.num_layers, num_attention_heads=s.num_heads, num_key_value_heads=s.num_kv_heads,
        hidden_act="silu", max_position_embeddings=s.max_position_embeddings, initializer_range=0.02,
        rms_norm_eps=1e-5, use_cache=True, bos_token_id=bos, eos_token_id=eos, pad_token_id=pad,
        tie_word_embeddings=False, rope_parameters={"rope_type": "default", "rope_theta": s.rope_theta},
        attention_bias=False, mlp_bias=False,
    )
    torch.manual_seed(s.seed)
    model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(bos_token_id=bos, eos_token_id=eos, pad_token_id=pad)
    return model


def count_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


# --------------------------------------------------------------------------------------------------- pretrain

def _packed_blocks(tokenizer, texts, seq_len: int, seed: int):
    """Each text becomes ``<s> text </s>``; the shuffled documents are concatenated and cut into blocks."""
    import random

    import torch

    docs = list(texts)
    random.Random(seed).shuffle(docs)  # noqa: S311 -- reproducible order, not crypto
    encoded = tokenizer(docs, add_special_tokens=False)["input_ids"]
    stream = []
    for ids in encoded:
        stream += [tokenizer.bos_token_id, *ids, tokenizer.eos_token_id]
    n = len(stream) // seq_len
    if n == 0:
        raise ValueError(f"pretrain: {len(stream)} tokens are fewer than one block of {seq_len}")
    return torch.tensor(stream[:n * seq_len], dtype=torch.long).view(n, seq_len)


def _lr_at(step: int, steps: int, peak: float, warmup: int) -> float:
    """Linear warm-up, then cosine decay to 10% of the peak."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def pretrain(model, tokenizer, texts, *, steps: int = 120, batch_size: int = 8, seq_len: int = 128,
             learning_rate: float = 3e-3, warmup_steps: int = 12, seed: int = 0,
             max_seconds: float | None = None, log_every_s: float = 10.0, threads: int | None = 2) -> dict:
    """Full-parameter causal-LM training on packed plain ``texts`` (CPU, fp32, seeded, fixed step count).

    ``max_seconds`` is a safety stop only: when it triggers the result is no longer a function of the inputs.
    Uses ``threads`` CPU threads (at most the cores; 2 gives the same numerics on any machine; None keeps the
    process's count, e.g. a benchmark's choice); the previous count is restored.
    Returns steps, first/final loss (final = mean of the last 10% of steps), seconds, tokens and tokens/s.
    """
    import torch

    prev_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(min(threads, os.cpu_count() or 1))
    try:
        torch.manual_seed(seed)
        blocks = _packed_blocks(tokenizer, texts, seq_len, seed)
        gen = torch.Generator().manual_seed(seed)
        model.train()
        decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
        no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
        opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                                lr=learning_rate, betas=(0.9, 0.95), eps=1e-8)
        order, pos = torch.randperm(len(blocks), generator=gen), 0
        losses: list[float] = []
        t0 = last_log = time.monotonic()
        for step in range(steps):
            if pos + batch_size > len(order):  # next epoch: a new seeded order
                order, pos = torch.randperm(len(blocks), generator=gen), 0
            batch = blocks[order[pos:pos + min(batch_size, len(order))]]
            pos += batch_size
            for group in opt.param_groups:
                group["lr"] = _lr_at(step, steps, learning_rate, warmup_steps)
            loss = model(input_ids=batch, labels=batch).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(loss.item())
            now = time.monotonic()
            if now - last_log >= log_every_s:
                last_log = now
                log.info("pretrain step %d/%d loss %.3f (%.0f tokens/s)", step + 1, steps, losses[-1],
                         (step + 1) * batch_size * seq_len / (now - t0))
            if max_seconds is not None and now - t0 >= max_seconds:
                log.warning("pretrain stopped by max_seconds=%s after %d/%d steps", max_seconds, step + 1, steps)
                break
        model.eval()
        seconds = time.monotonic() - t0
        tail = max(1, len(losses) // 10)
        tokens = len(losses) * batch_size * seq_len
        return {"steps": len(losses), "first_loss": round(losses[0], 4),
                "final_loss": round(sum(losses[-tail:]) / tail, 4), "seconds": round(seconds, 2),
                "tokens": tokens, "tokens_per_s": round(tokens / seconds, 1) if seconds else None,
                "epochs": round(tokens / blocks.numel(), 3), "threads": torch.get_num_threads()}
    finally:
        torch.set_num_threads(prev_threads)


# --------------------------------------------------------------------------------------------------- corpus

def parse_chatml(data: bytes, where: str = "train.jsonl") -> list[dict]:
    """ChatML JSONL (as written by prepare_chatml) -> records; a broken line is a StepError naming it."""
    from tasks.errors import StepError

    records = []
    for number, line in enumerate(data.decode("utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
            messages = obj["messages"]
            if not all(isinstance(m["content"], str) and isinstance(m["role"], str) for m in messages):
                raise TypeError("message role/content must be strings")
        except (ValueError, KeyError, TypeError) as exc:
            raise StepError(f"{where} line {number} is not a ChatML record ({exc})") from exc
        records.append(obj)
    if not records:
        raise StepError(f"{where} holds no conversations; nothing to build a base model from")
    return records


def corpus(records: list[dict]) -> tuple[list[str], list[str]]:
    """(tokenizer texts: every distinct message content, pre-training documents: the distinct user and assistant
    contents, each its own document)."""
    all_texts = list(dict.fromkeys(m["content"] for r in records for m in r["messages"] if m["content"]))
    docs = list(dict.fromkeys(m["content"] for r in records for m in r["messages"]
                              if m["role"] in ("user", "assistant") and m["content"]))
    return all_texts, docs


def fingerprint(train_bytes: bytes, settings: DemoSettings) -> str:
    payload = {"train_sha256": hashlib.sha256(train_bytes).hexdigest(), "settings": dataclasses.asdict(settings),
               "version": DEMO_VERSION}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def build_local(records: list[dict], out_dir: str, settings: DemoSettings) -> dict:
    """Tokenizer + model + pre-training, saved with save_pretrained into ``out_dir``; returns the statistics."""
    from tasks.ml.model_source import check_chat_template

    texts, docs = corpus(records)
    t0 = time.monotonic()
    tokenizer = build_tokenizer(texts, settings.vocab_size, settings.max_position_embeddings)
    model = build_model(tokenizer, settings)
    log.info("demo model: %d parameters, vocabulary %d (tokenizer trained on %d texts, both built in %.1fs)",
             count_params(model), len(tokenizer), len(texts), time.monotonic() - t0)
    stats = pretrain(model, tokenizer, docs, steps=settings.steps, batch_size=settings.batch_size,
                     seq_len=settings.seq_len, learning_rate=settings.learning_rate,
                     warmup_steps=settings.warmup_steps, seed=settings.seed)
    log.info("pretrained %d steps in %.1fs (%.0f tokens/s): loss %.3f -> %.3f", stats["steps"], stats["seconds"],
             stats["tokens_per_s"] or 0, stats["first_loss"], stats["final_loss"])
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    check_chat_template(tokenizer, out_dir)
    return {"params": count_params(model), "vocab_size": len(tokenizer), "pretrain": stats,
            "n_texts": len(texts), "n_documents": len(docs)}


# ------------------------------------------------------------------------------------------ S3 folder

def existing_build(dest: str) -> dict | None:
    """The fingerprint record of the demo model already under dest, None when there is none (or it is unreadable)."""
    from tasks.io import s3

    uri = dest + FINGERPRINT_FILE
    if not s3.head(uri):
        return None
    try:
        return s3.get_json(uri)
    except ValueError:
        return None


def remove_stale(dest: str, keep_keys: set[str]) -> int:
    """Delete objects under ``dest`` that the new model does not have (left over from an older build)."""
    from tasks.io import s3

    bucket, _ = s3.split_uri(dest)
    stale = [o["key"] for o in s3.list_objects(dest) if o["key"] not in keep_keys]
    for key in stale:
        s3.client().delete_object(Bucket=bucket, Key=key)
    return len(stale)


def main(argv: list[str] | None = None) -> int:
    """Local build from the synthetic generator (no S3): handy to look at the model or time the pre-training."""
    from tasks.demo import datagen

    p = argparse.ArgumentParser(prog="python -m tasks.demo.model", description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="folder to save the model and tokenizer into")
    p.add_argument("--rows", type=int, default=2400)
    p.add_argument("--data-seed", type=int, default=0)
    p.add_argument("--size", default="demo", choices=sorted(SIZES))
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--system-prompt", default=None, help="default: data.system_prompt of the config defaults")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(levelname)s %(message)s")
    from tasks.config import DataConfig

    system = args.system_prompt or DataConfig().system_prompt
    records = [{"messages": [{"role": "system", "content": system}, {"role": "user", "content": r["instruction"]},
                             {"role": "assistant", "content": r["response"]}]}
               for r in datagen.generate_rows(args.rows, args.data_seed)]
    os.makedirs(args.out, exist_ok=True)
    built = build_local(records, args.out, settings_for(args.size, steps=args.steps))
    print(json.dumps({"out": args.out, **built}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
