"""Static KV cache and a compiled decode step for Llama-architecture models (the GPU path of the chat worker).

The dynamic path (``engine.Batch``) grows and re-pads a ``DynamicCache`` every step, which allocates and copies on
every token and cannot be captured in a CUDA graph. Here every row of the batch owns a fixed slot in preallocated
key/value buffers ``[rows, kv_heads, width, head_dim]`` per layer and keeps its own position, so one decode step has
the same shapes every time: it writes each row's new key/value at that row's position and attends over the whole
width with a mask ``column <= position``. Fixed shapes and in-place writes are what ``torch.compile`` with CUDA
graphs (``mode="reduce-overhead"``) needs; a step is then one graph replay instead of hundreds of kernel launches.

Prefill stays eager (variable length, the model's own forward, the requests that arrived together in one
left-padded pass) and each request's part of its cache is copied into the request's slot. Decode reuses the model's
modules (norms, projections, rotary embedding, MLP), so the arithmetic is the model's own; only the cache bookkeeping
and the attention call are ours. A row's stale keys from an earlier request
sit beyond its position and are masked, which the slot-reuse test checks against one-at-a-time ``generate``.
"""

from __future__ import annotations

import logging
import sys

log = logging.getLogger("tasks.chat.static_cache")

SUPPORTED = ("llama",)  # architectures whose attention is exactly LlamaAttention (no sliding window, no softcap)


def wanted(setting: str, device) -> bool:
    """'on' / 'off' as given; 'auto' = on for CUDA devices (on CPU the dynamic cache is faster: bench/RESULTS.md)."""
    return setting == "on" or (setting == "auto" and device.type == "cuda")


def unsupported_reason(model) -> str | None:
    cfg = getattr(model, "config", None)
    if getattr(cfg, "model_type", None) not in SUPPORTED:
        return f"model_type {getattr(cfg, 'model_type', None)!r} is not one of {SUPPORTED}"
    if not hasattr(getattr(model, "model", None), "layers") or not hasattr(model, "lm_head"):
        return "not a *ForCausalLM with .model.layers and .lm_head (an unmerged adapter?)"
    if getattr(cfg, "sliding_window", None) or getattr(cfg, "attn_logit_softcapping", None):
        return "sliding-window or soft-capped attention"
    return None


class StaticDecoder:
    """Preallocated KV slots for ``rows`` requests of up to ``width`` tokens, and the one-token decode step."""

    def __init__(self, model, rows: int, width: int, compile_step: bool = False):
        import torch

        self.model, self.core = model, model.model
        self.rows, self.width = rows, width
        cfg = model.config
        attn = self.core.layers[0].self_attn
        self.head_dim = attn.head_dim
        kv_heads = cfg.num_key_value_heads
        p = next(model.parameters())
        shape = (rows, kv_heads, width, self.head_dim)
        self.keys = [torch.zeros(shape, dtype=p.dtype, device=p.device) for _ in self.core.layers]
        self.values = [torch.zeros(shape, dtype=p.dtype, device=p.device) for _ in self.core.layers]
        self.device = p.device
        self._rope = sys.modules[type(self.core).__module__].apply_rotary_pos_emb
        self._columns = torch.arange(width, device=p.device)
        self._row_index = torch.arange(rows, device=p.device)
        self.compiled = None
        self.fallbacks = 0  # compiled calls that failed (decoding went eager for good); bench/chat.py reports it
        if compile_step:
            for t in (*self.keys, *self.values, self._columns, self._row_index):
                torch._dynamo.mark_static_address(t)  # in-place writes must not break the CUDA graph
            mode = "reduce-overhead" if p.device.type == "cuda" else "default"
            self.compiled = torch.compile(self._forward, mode=mode, fullgraph=True, dynamic=False)
        log.info("static KV cache: %d rows x %d tokens x %d layers (%.0f MiB), decode step %s", rows, width,
                 len(self.keys), 2 * sum(t.numel() * t.element_size() for t in self.keys) / 2**20,
                 "compiled" if compile_step else "eager")

    def load_prefix(self, row: int, cache, index: int = 0, start: int = 0) -> int:
        """Copy row ``index`` of a prefill cache (the model's own), from column ``start`` on (after its left
        padding), into slot ``row``; returns the prompt's length."""
        n = 0
        for i, layer in enumerate(cache.layers):
            n = layer.keys.shape[2] - start
            self.keys[i][row, :, :n] = layer.keys[index, :, start:]
            self.values[i][row, :, :n] = layer.values[index, :, start:]
        return n

    def step(self, tokens: list[int], positions: list[int]) -> list[int]:
        """One greedy token for every row: ``tokens[r]`` is row r's last token, at position ``positions[r]``."""
        import torch

        ids = torch.tensor(tokens, dtype=torch.long, device=self.device)
        pos = torch.tensor(positions, dtype=torch.long, device=self.device)
        with torch.inference_mode():
            if self.compiled is not None:
                try:
                    return self.compiled(ids, pos).tolist()
                except Exception as exc:  # a compiler problem must cost speed, never replies
                    self.fallbacks += 1
                    log.warning("compiled decode step failed (%s: %s); decoding eagerly from now on",
                                type(exc).__name__, str(exc)[:300])
                    self.compiled = None
            return self._forward(ids, pos).tolist()

    def warm_up(self) -> float:
        """Run the step a few times on free rows (compile, then CUDA-graph warm-up and capture); returns seconds.
        The capture belongs to the calling thread, so the thread that decodes runs it too (the compiled code is shared
        by all threads). Writes only position 0 of each row, which every prefill overwrites."""
        import time

        started = time.monotonic()
        for _ in range(3):
            self.step([0] * self.rows, [0] * self.rows)
        return time.monotonic() - started

    def _forward(self, ids, pos):
        """[rows] last tokens at [rows] positions -> [rows] next tokens. Writes each row's key/value at its position
        (the same value again if a failed compiled call already wrote it, so a retry is harmless)."""
        core, n = self.core, ids.shape[0]
        x = core.embed_tokens(ids[:, None])  # [rows, 1, hidden]
        cos, sin = core.rotary_emb(x, pos[:, None])
        hidden = (self._columns[None, :] > pos[:, None])[:, None, None, :]  # [rows, 1, 1, width]: after pos
        for i, layer in enumerate(core.layers):
            attn = layer.self_attn
            h = layer.input_layernorm(x)
            q = attn.q_proj(h).view(n, 1, -1, self.head_dim).transpose(1, 2)
            k = attn.k_proj(h).view(n, 1, -1, self.head_dim).transpose(1, 2)
            v = attn.v_proj(h).view(n, 1, -1, self.head_dim).transpose(1, 2)
            q, k = self._rope(q, k, cos, sin)
            self.keys[i][self._row_index, :, pos] = k[:, :, 0]
            self.values[i][self._row_index, :, pos] = v[:, :, 0]
            o = self._attend(q, self.keys[i], self.values[i], hidden, attn.scaling)
            x = x + attn.o_proj(o.reshape(n, 1, -1))
            x = x + layer.mlp(layer.post_attention_layernorm(x))
        logits = self.model.lm_head(core.norm(x)[:, -1])
        return logits.argmax(dim=-1)

    @staticmethod
    def _attend(q, keys, values, hidden, scale):
        """Attention of one query token per row over its slot, grouped-query without expanding the cache: the query
        heads sharing a KV head are one matrix [groups, head_dim] against that head's keys (SDPA with a mask and
        enable_gqa may take the math kernel, which copies every KV head ``groups`` times: for one query token that
        copy would cost more than the attention itself).
        Softmax in float32 like the model's eager attention. Returns [rows, heads * head_dim]."""
        import torch

        rows, heads, _, dim = q.shape
        kv_heads = keys.shape[1]
        qg = q.reshape(rows, kv_heads, heads // kv_heads, dim)  # query head h reads KV head h // groups
        scores = torch.matmul(qg, keys.transpose(-1, -2)) * scale  # [rows, kv_heads, groups, width]
        weights = scores.masked_fill(hidden, float("-inf")).softmax(dim=-1, dtype=torch.float32).to(q.dtype)
        return torch.matmul(weights, values).reshape(rows, heads * dim)


def build(model, chat_cfg, rows: int, width: int) -> StaticDecoder | None:
    """The decoder the chat config asks for, or None (with the reason logged) for the dynamic path."""
    device = next(model.parameters()).device
    if not wanted(chat_cfg.static_cache, device):
        return None
    reason = unsupported_reason(model)
    if reason:
        log.info("static KV cache off: %s; using the dynamic cache", reason)
        return None
    return StaticDecoder(model, rows, width, compile_step=wanted(chat_cfg.compile, device))
