"""Greedy answer generation for evaluation: batched (left-padded, length-sorted) and a one-at-a-time reference.

torch / transformers / peft are imported inside the functions so that importing this module stays cheap.

Prompt tokens: rendered chat text is tokenized with ``add_special_tokens=False`` and the tokenizer's BOS is put in
front exactly when the tokenizer adds one by default (Llama / TinyLlama: ``<s>``) and the text does not already
start with it (``with_bos``). Training (``training.encode``), evaluation, the one-at-a-time reference and the chat
service all use this rule, so a conversation's prompt part has the same ids everywhere and a chat template that
writes its own BOS never gets a second one.

Batched generation: prompts are sorted by token length (longest first, ties by original position) and cut into
batches; each batch is LEFT-padded by hand (so the last prompt token of every row sits in the last column), with an
explicit attention mask. transformers' ``generate`` derives position ids from that mask (cumsum - 1), so a padded
row sees positions 0..len-1 exactly like the same prompt alone. The attention mask must always be passed: chat
templates put ``</s>`` inside the prompt and the pad id is usually ``</s>`` too, so a mask guessed from the pad id
would hide real prompt tokens. Decoding is greedy (``do_sample=False, num_beams=1``) with the KV cache; a row stops
at its first EOS and the answer is the new tokens before it.
"""

from __future__ import annotations

import logging

log = logging.getLogger("tasks.ml.generation")


def render_prompts(tokenizer, conversations: list[list[dict]]) -> list[str]:
    """The chat-template prompt for each conversation, without its final assistant turn, ending in the
    assistant header (``add_generation_prompt=True``)."""
    prompts = []
    for messages in conversations:
        msgs = list(messages)
        if msgs and msgs[-1].get("role") == "assistant":
            msgs = msgs[:-1]
        if not msgs:
            raise ValueError("a conversation has no message before the assistant answer")
        prompts.append(tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True))
    return prompts


def adds_bos(tokenizer) -> bool:
    """Whether the tokenizer puts its BOS in front of a text by default (its post-processor does)."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return False
    with_special = tokenizer("a", add_special_tokens=True)["input_ids"]
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    return with_special[:1] == [bos] and plain[:1] != [bos]


def with_bos(tokenizer, ids: list[int], add: bool | None = None) -> list[int]:
    """ids (of text tokenized with add_special_tokens=False) with the BOS rule of the module doc applied.
    ``add`` is ``adds_bos(tokenizer)`` when the caller has it already (it tokenizes twice)."""
    bos = tokenizer.bos_token_id
    add = adds_bos(tokenizer) if add is None else add
    return [bos, *ids] if add and ids[:1] != [bos] else list(ids)


def encode_prompts(tokenizer, prompts: list[str]) -> list[list[int]]:
    """Token ids of rendered prompts (see the module doc for the BOS rule)."""
    add = adds_bos(tokenizer)
    out = []
    for prompt in prompts:
        ids = with_bos(tokenizer, tokenizer(prompt, add_special_tokens=False)["input_ids"], add)
        if not ids:
            raise ValueError("a prompt encodes to no tokens")
        out.append(ids)
    return out


def _pad_id(tokenizer) -> int:
    for tok_id in (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id):
        if tok_id is not None:
            return int(tok_id)
    raise ValueError("the tokenizer has no pad, eos or unk token to pad with")


def eos_token_ids(model, tokenizer) -> list[int]:
    ids: list[int] = []
    for source in (tokenizer.eos_token_id, getattr(getattr(model, "generation_config", None), "eos_token_id", None)):
        if source is None:
            continue
        for tok_id in source if isinstance(source, (list, tuple)) else [source]:
            if int(tok_id) not in ids:
                ids.append(int(tok_id))
    return ids


def _model_device(model):
    try:
        return next(model.parameters()).device
    except StopIteration:  # pragma: no cover - a model without parameters
        import torch

        return torch.device("cpu")


def _cut(new_tokens: list[int], eos_ids: list[int]) -> list[int]:
    for i, tok in enumerate(new_tokens):
        if tok in eos_ids:
            return new_tokens[:i]
    return new_tokens


def _generate(model, input_ids, attention_mask, max_new_tokens: int, pad_id: int, eos_ids: list[int]):
    return model.generate(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=max_new_tokens,
                          do_sample=False, num_beams=1, use_cache=True, pad_token_id=pad_id,
                          eos_token_id=eos_ids or None)


CPU_BATCH, GPU_BATCH_CAP, KV_SHARE = 32, 256, 0.5  # eval.batch_size=0 (auto); see auto_batch_size


def kv_bytes_per_token(model) -> int:
    """Bytes of KV cache one token takes in every layer of ``model`` (keys and values, the model's dtype)."""
    cfg = model.config
    heads = cfg.num_attention_heads
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    return 2 * cfg.num_hidden_layers * kv_heads * head_dim * next(model.parameters()).element_size()


def auto_batch_size(model, tokens_per_row: int, free_bytes: int | None) -> int:
    """eval.batch_size=0: CPU_BATCH without a GPU (``free_bytes`` None); on a GPU as many rows as GPU_BATCH_CAP, as
    long as their KV cache (``tokens_per_row`` each: the longest prompt plus the new tokens) takes at most KV_SHARE of
    the free memory -- the rest is for the activations of the prefill and the logits."""
    if free_bytes is None:
        return CPU_BATCH
    rows = int(free_bytes * KV_SHARE) // max(1, kv_bytes_per_token(model) * tokens_per_row)
    return max(1, min(GPU_BATCH_CAP, rows))


def free_gpu_bytes(device) -> int | None:
    import torch

    return torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else None


def resolve_batch_size(model, encoded: list[list[int]], max_new_tokens: int, batch_size: int, device) -> int:
    """``batch_size``, or for 0 (auto) the ``auto_batch_size`` of these prompts on ``device`` (logged)."""
    if batch_size:
        return batch_size
    longest = max(map(len, encoded)) + max_new_tokens
    batch_size = auto_batch_size(model, longest, free_gpu_bytes(device))
    log.info("generation batch: %d prompts (eval.batch_size=0, auto; %d tokens per row at most)", batch_size, longest)
    return batch_size


def generate_token_ids(model, tokenizer, prompts: list[str], max_new_tokens: int, batch_size: int,
                       device=None) -> list[list[int]]:
    """Greedy answer token ids (EOS and padding removed), batched and left-padded, in the prompts' order.
    ``batch_size`` 0 = auto (``auto_batch_size``)."""
    import torch

    if batch_size < 0:
        raise ValueError("batch_size must be >= 0 (0 = auto)")
    if not prompts:
        return []
    device = torch.device(device) if device is not None else _model_device(model)
    encoded = encode_prompts(tokenizer, prompts)
    batch_size = resolve_batch_size(model, encoded, max_new_tokens, batch_size, device)
    pad_id = _pad_id(tokenizer)
    eos_ids = eos_token_ids(model, tokenizer)
    order = sorted(range(len(encoded)), key=lambda i: (-len(encoded[i]), i))
    results: list[list[int] | None] = [None] * len(encoded)
    saved_side = tokenizer.padding_side
    tokenizer.padding_side = "left"  # for anyone reading the tokenizer meanwhile; padding below is done by hand
    try:
        with torch.inference_mode():
            for start in range(0, len(order), batch_size):
                chunk = order[start:start + batch_size]
                width = max(len(encoded[i]) for i in chunk)
                ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
                mask = torch.zeros((len(chunk), width), dtype=torch.long)
                for row, i in enumerate(chunk):
                    n = len(encoded[i])
                    ids[row, width - n:] = torch.tensor(encoded[i], dtype=torch.long)
                    mask[row, width - n:] = 1
                out = _generate(model, ids.to(device), mask.to(device), max_new_tokens, pad_id, eos_ids)
                for row, i in enumerate(chunk):
                    results[i] = _cut(out[row, width:].tolist(), eos_ids)
    finally:
        tokenizer.padding_side = saved_side
    return results  # type: ignore[return-value]


def generate_token_ids_one_at_a_time(model, tokenizer, prompts: list[str], max_new_tokens: int,
                                     device=None) -> list[list[int]]:
    """Reference: one prompt per ``generate`` call, no padding, greedy; same prompt ids as the batched path."""
    import torch

    device = torch.device(device) if device is not None else _model_device(model)
    pad_id = _pad_id(tokenizer)
    eos_ids = eos_token_ids(model, tokenizer)
    results = []
    with torch.inference_mode():
        for ids in encode_prompts(tokenizer, prompts):
            input_ids = torch.tensor([ids], dtype=torch.long, device=device)
            out = _generate(model, input_ids, torch.ones_like(input_ids), max_new_tokens, pad_id, eos_ids)
            results.append(_cut(out[0, len(ids):].tolist(), eos_ids))
    return results


def decode_answers(tokenizer, token_ids: list[list[int]]) -> list[str]:
    return [tokenizer.decode(ids, skip_special_tokens=True).strip() for ids in token_ids]


def generate_batched(model, tokenizer, prompts: list[str], max_new_tokens: int, batch_size: int,
                     device=None) -> list[str]:
    """Greedy answers, batched (left-padded, longest prompts first), returned in the prompts' original order."""
    ids = generate_token_ids(model, tokenizer, prompts, max_new_tokens, batch_size, device=device)
    return decode_answers(tokenizer, ids)


def generate_one_at_a_time(model, tokenizer, prompts: list[str], max_new_tokens: int, device=None) -> list[str]:
    """The reference for ``generate_batched``: batch size 1, no padding, greedy."""
    return decode_answers(tokenizer, generate_token_ids_one_at_a_time(model, tokenizer, prompts, max_new_tokens,
                                                                      device=device))


def merge_for_inference(model):
    """A peft model with its adapters merged into the base weights (faster to run); other models as they are.

    Either way the model is put in eval mode (no dropout). Note that peft merges in place: the base model's
    weights change, so keep no reference to the unmerged model expecting base-model outputs.
    """
    try:
        from peft import PeftModel
    except ImportError:  # pragma: no cover - peft is a project dependency
        PeftModel = None  # noqa: N806
    if PeftModel is not None and isinstance(model, PeftModel):
        model = model.merge_and_unload()
    return model.eval()
