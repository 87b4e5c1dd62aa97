"""The demo base model: a TinyLlama-shaped tokenizer and Llama model, built and briefly pre-trained on CPU."""

import json

import pytest

from tasks.demo import datagen
from tasks.demo import model as demo_model
from tasks.errors import StepError

SYSTEM = "You are a helpful, polite customer-support assistant for an online store."
TINY = demo_model.SIZES["tiny"]


def records(n: int = 160) -> list[dict]:
    return [{"messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": r["instruction"]},
                          {"role": "assistant", "content": r["response"]}], "intent": r["intent"]}
            for r in datagen.generate_rows(n, seed=5)]


@pytest.fixture(scope="module")
def corpus():
    return demo_model.corpus(records())


@pytest.fixture(scope="module")
def tok(corpus):
    texts, _ = corpus
    return demo_model.build_tokenizer(texts, vocab_size=TINY.vocab_size, model_max_length=512)


@pytest.fixture(scope="module")
def trained(tok, corpus):
    """(model, pretrain stats): tiny model, a few seconds of pre-training."""
    model = demo_model.build_model(tok, "tiny")
    stats = demo_model.pretrain(model, tok, corpus[1], steps=TINY.steps, batch_size=TINY.batch_size,
                                seq_len=TINY.seq_len, learning_rate=TINY.learning_rate,
                                warmup_steps=TINY.warmup_steps, seed=0)
    return model, stats


def test_special_tokens_like_llama(tok):
    assert tok.convert_tokens_to_ids(["<unk>", "<s>", "</s>"]) == [0, 1, 2]
    assert (tok.unk_token_id, tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (0, 1, 2, 2)
    marker_ids = tok.convert_tokens_to_ids(list(demo_model.CHAT_MARKERS))
    assert len(set(marker_ids)) == 3 and min(marker_ids) >= 3 and all(i != tok.unk_token_id for i in marker_ids)
    for marker, mid in zip(demo_model.CHAT_MARKERS, marker_ids, strict=True):
        assert tok(marker).input_ids == [1, mid]  # one id each, after the BOS Llama prepends
        assert tok(marker, add_special_tokens=False).input_ids == [mid]
    assert len(tok) <= TINY.vocab_size + 3


@pytest.mark.parametrize("text", [
    "Where is my order {{Order Number}}?",
    "I'd like a refund of {{Currency Symbol}}{{Refund Amount}} 😀 thx!!",
    "Steps:\n1. Open {{Website URL}}\n2. Go to {{Online Order Interaction}}\n\n3.  Done  (double  spaces)\t tab",
    "  leading spaces, ünïcödé, 中文, ελληνικά and a trailing newline\n",
    "a < b > c & d {{ }} {% not a template %}",
])
def test_byte_level_round_trip(tok, text):
    ids = tok(text).input_ids
    assert ids[0] == tok.bos_token_id and tok.unk_token_id not in ids
    assert tok.decode(ids, skip_special_tokens=True) == text


def test_tokenizer_training_is_deterministic(tok, corpus):
    again = demo_model.build_tokenizer(corpus[0], vocab_size=TINY.vocab_size, model_max_length=512)
    assert again.get_vocab() == tok.get_vocab()


CONVERSATION = [{"role": "system", "content": "Be nice."}, {"role": "user", "content": "Cancel {{Order Number}}"},
                {"role": "assistant", "content": "Sure.\n1. Open Orders\n2. Click Cancel"}]


def test_chat_template_renders_zephyr_exactly(tok):
    assert tok.chat_template == demo_model.ZEPHYR_CHAT_TEMPLATE
    full = tok.apply_chat_template(CONVERSATION, tokenize=False)
    assert full == ("<|system|>\nBe nice.</s>\n<|user|>\nCancel {{Order Number}}</s>\n"
                    "<|assistant|>\nSure.\n1. Open Orders\n2. Click Cancel</s>\n")
    prompt = tok.apply_chat_template(CONVERSATION[:2], tokenize=False, add_generation_prompt=True)
    assert prompt == "<|system|>\nBe nice.</s>\n<|user|>\nCancel {{Order Number}}</s>\n<|assistant|>\n"
    assert full.startswith(prompt)


def test_apply_chat_template_tokenizes(tok):
    ids = tok.apply_chat_template(CONVERSATION, tokenize=True, return_dict=False)
    if isinstance(ids, dict) or hasattr(ids, "keys"):
        ids = ids["input_ids"]
    rendered = tok.apply_chat_template(CONVERSATION, tokenize=False)
    assert list(ids) == tok(rendered, add_special_tokens=False).input_ids
    markers = tok.convert_tokens_to_ids(["<|system|>", "<|user|>", "<|assistant|>"])
    assert [i for i in ids if i in markers] == markers
    assert ids.count(tok.eos_token_id) == 3
    assert tok.decode(ids) == rendered


def test_model_shape_like_tinyllama(tok):
    model = demo_model.build_model(tok, "tiny")
    c = model.config
    assert c.model_type == "llama" and type(model).__name__ == "LlamaForCausalLM"
    assert c.vocab_size == len(tok) and not c.tie_word_embeddings
    assert c.num_key_value_heads < c.num_attention_heads  # grouped-query attention
    assert (c.bos_token_id, c.eos_token_id, c.pad_token_id) == (1, 2, 2)
    g = model.generation_config
    assert (g.bos_token_id, g.eos_token_id, g.pad_token_id) == (1, 2, 2)
    names = {n.rsplit(".", 1)[0].rsplit(".", 1)[-1] for n, _ in model.named_parameters()}
    assert {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"} <= names  # LoRA targets
    demo = demo_model.settings_for("demo")
    assert 192 <= demo.hidden_size <= 256 and demo.num_kv_heads == 2 and demo.max_position_embeddings == 1024


def test_build_model_is_seeded(tok):
    import torch

    a, b = demo_model.build_model(tok, "tiny"), demo_model.build_model(tok, "tiny")
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))


def test_pretrain_lowers_the_loss(trained):
    _, stats = trained
    assert stats["steps"] == TINY.steps
    assert stats["final_loss"] < stats["first_loss"] - 1.0, stats
    assert stats["tokens"] == TINY.steps * TINY.batch_size * TINY.seq_len and stats["tokens_per_s"] > 0


def test_pretrain_is_deterministic(tok, corpus):
    runs = []
    for _ in range(2):
        model = demo_model.build_model(tok, "tiny")
        runs.append(demo_model.pretrain(model, tok, corpus[1], steps=3, batch_size=4, seq_len=32, seed=3))
    assert runs[0]["final_loss"] == runs[1]["final_loss"] and runs[0]["first_loss"] == runs[1]["first_loss"]


def test_forward_and_generate(trained, tok):
    import torch

    model, _ = trained
    enc = tok.apply_chat_template(CONVERSATION[:2], add_generation_prompt=True, return_tensors="pt",
                                  return_dict=True)
    with torch.no_grad():
        logits = model(**enc).logits
    assert logits.shape == (1, enc["input_ids"].shape[1], len(tok)) and torch.isfinite(logits).all()
    out = model.generate(**enc, max_new_tokens=8, do_sample=False)
    assert out.shape[1] > enc["input_ids"].shape[1]


def test_save_and_reload_round_trip(trained, tok, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model, _ = trained
    model.save_pretrained(tmp_path, safe_serialization=True)
    tok.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists() and (tmp_path / "tokenizer.json").exists()
    tok2 = AutoTokenizer.from_pretrained(tmp_path)
    model2 = AutoModelForCausalLM.from_pretrained(tmp_path)
    text = "Track {{Order Number}} 😀\n1. now"
    assert tok2(text).input_ids == tok(text).input_ids
    assert tok2.chat_template == demo_model.ZEPHYR_CHAT_TEMPLATE
    assert tok2.apply_chat_template(CONVERSATION, tokenize=False) == tok.apply_chat_template(CONVERSATION,
                                                                                               tokenize=False)
    assert tok2.convert_tokens_to_ids("<|assistant|>") == tok.convert_tokens_to_ids("<|assistant|>")
    enc = tok(text, return_tensors="pt")
    with torch.no_grad():
        assert torch.allclose(model(**enc).logits, model2(**enc).logits, atol=1e-5)
        a = model.generate(**enc, max_new_tokens=6, do_sample=False)
        b = model2.generate(**enc, max_new_tokens=6, do_sample=False)
    assert torch.equal(a, b)
    assert model2.generation_config.eos_token_id == tok.eos_token_id


def test_corpus_keeps_instruction_and_response_separate():
    recs = records(20)
    texts, docs = demo_model.corpus(recs)
    assert SYSTEM in texts and SYSTEM not in docs
    assert recs[0]["messages"][1]["content"] in docs and recs[0]["messages"][2]["content"] in docs
    assert not any("<|user|>" in d or "<|assistant|>" in d for d in docs)


def test_fingerprint_depends_on_data_and_settings():
    data = b'{"messages": []}\n'
    base = demo_model.fingerprint(data, TINY)
    assert base == demo_model.fingerprint(data, demo_model.settings_for("tiny"))
    assert base != demo_model.fingerprint(data + b"\n", TINY)
    assert base != demo_model.fingerprint(data, demo_model.settings_for("tiny", seed=1))
    assert base != demo_model.fingerprint(data, demo_model.settings_for("demo"))


def test_bad_inputs_are_step_errors():
    with pytest.raises(StepError, match="unknown size"):
        demo_model.settings_for("huge")
    with pytest.raises(StepError, match="steps, batch_size must be >= 1"):
        demo_model.settings_for("tiny", steps=0)
    with pytest.raises(StepError, match="line 2 is not a ChatML record"):
        demo_model.parse_chatml(json.dumps(records(1)[0]).encode() + b"\n{broken\n")
    with pytest.raises(StepError, match="no conversations"):
        demo_model.parse_chatml(b"\n\n")
