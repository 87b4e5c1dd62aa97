"""Streaming a reply decodes each new piece with a few tokens of context, not the whole reply at every token, and
the streamed pieces add up to exactly the stored reply: the whole decode, stripped.

Two tokenizers built here (no download): the demo's byte-level BPE (a multi-byte character may span tokens: held
back until complete) and a SentencePiece-style one (Metaspace: a piece decoded alone loses its leading space, which
is why the window keeps the previous piece as context), as Llama/TinyLlama's is.
"""

from __future__ import annotations

import pytest

pytest.importorskip("transformers")

from tasks.chat.engine import Job  # noqa: E402
from tasks.demo import datagen  # noqa: E402
from tasks.demo import model as demo_model  # noqa: E402

TEXTS = ["Your order {{Order Number}} ships today 🚚 — track it in “My orders”.",
         "  Leading spaces, then   double  spaces and a newline\nand café, naïve, Ünïcödé 日本語 ✓  ",
         "Sure! 1. Open the app. 2. Tap Refund . 3. Done :)"]


def corpus() -> list[str]:
    rows = datagen.generate_rows(200, seed=3)
    return [r["instruction"] for r in rows] + [r["response"] for r in rows] + TEXTS * 3


def metaspace_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Metaspace()])
    alphabet = [f"<0x{b:02X}>" for b in range(256)]
    tok.train_from_iterator(corpus(), trainers.BpeTrainer(vocab_size=700, special_tokens=["<unk>", "<s>", "</s>",
                                                                                            *alphabet]))
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


@pytest.fixture(scope="module", params=["byte-level BPE (demo)", "SentencePiece-style (Metaspace)"])
def tokenizer(request):
    if request.param.startswith("byte"):
        return demo_model.build_tokenizer(corpus(), vocab_size=600)
    return metaspace_tokenizer()


class CountingTokenizer:
    def __init__(self, tokenizer):
        self.tokenizer, self.lengths = tokenizer, []

    def decode(self, ids, **kwargs):
        self.lengths.append(len(ids))
        return self.tokenizer.decode(ids, **kwargs)


@pytest.mark.parametrize("text", [*TEXTS, "x" * 3 + " a reply of many words " * 20])
def test_streamed_pieces_add_up_to_the_stored_reply_and_each_decode_is_short(tokenizer, text):
    ids = tokenizer.encode(text, add_special_tokens=False) + [tokenizer.eos_token_id]
    counting, job = CountingTokenizer(tokenizer), Job(None, [], len(ids))
    for i, token in enumerate(ids):
        job.tokens.append(token)
        job.emit_text(counting, final=i == len(ids) - 1)
    pieces = [value for kind, value in list(job.events.queue) if kind == "token"]
    whole = tokenizer.decode(ids, skip_special_tokens=True).strip()
    assert "".join(pieces) == job.sent == whole
    assert len(pieces) > 1
    # the old stream decoded the whole reply at every token (up to len(ids) tokens); now a piece plus its context
    assert max(counting.lengths) <= 8, (max(counting.lengths), len(ids))
