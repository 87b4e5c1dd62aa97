"""Batched greedy generation must give exactly the tokens of one-prompt-at-a-time generation.

A tiny random Llama and a byte-level BPE tokenizer with TinyLlama's (Zephyr) chat template are built here, so
nothing is downloaded. The tokenizer prepends ``<s>`` by default like the Llama tokenizers do.
"""

from __future__ import annotations

import copy
import random
from collections import Counter

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from tasks.ml import generation  # noqa: E402

ZEPHYR_TEMPLATE = (
    "{% for message in messages %}\n{% if message['role'] == 'user' %}\n"
    "{{ '<|user|>\n' + message['content'] + eos_token }}\n{% elif message['role'] == 'system' %}\n"
    "{{ '<|system|>\n' + message['content'] + eos_token }}\n{% elif message['role'] == 'assistant' %}\n"
    "{{ '<|assistant|>\n'  + message['content'] + eos_token }}\n{% endif %}\n"
    "{% if loop.last and add_generation_prompt %}\n{{ '<|assistant|>' }}\n{% endif %}\n{% endfor %}"
)
SPECIAL = ["<unk>", "<s>", "</s>", "<|system|>", "<|user|>", "<|assistant|>"]
CORPUS = [
    "Where is my order? I placed it last week and it still has not arrived.",
    "I want a refund for the broken headphones I received yesterday.",
    "How do I change the shipping address on my account?",
    "Please cancel my subscription and confirm by email.",
    "You can track your package from the Orders page in your account.",
    "We are sorry for the delay; a replacement is on its way.",
]
MAX_NEW = 12
BATCH = 4


@pytest.fixture(scope="module")
def tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIAL, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS * 10, trainer)
    tok.post_processor = processors.TemplateProcessing(  # Llama-style: <s> in front by default
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", tok.token_to_id("<s>"))])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   chat_template=ZEPHYR_TEMPLATE)


def _tiny_llama(tokenizer, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def model(tokenizer):
    return _tiny_llama(tokenizer)


@pytest.fixture(scope="module")
def prompts(tokenizer):
    rng = random.Random(0)
    words = " ".join(CORPUS).split()
    lengths = [1, 3, 60, 7, 25, 2, 40, 12, 5, 90, 18, 9]
    convs = [[{"role": "system", "content": "Be helpful."},
              {"role": "user", "content": " ".join(rng.choices(words, k=k))},
              {"role": "assistant", "content": "reference answer, dropped from the prompt"}] for k in lengths]
    return generation.render_prompts(tokenizer, convs)


@pytest.fixture(scope="module")
def reference(model, tokenizer, prompts):
    return generation.generate_token_ids_one_at_a_time(model, tokenizer, prompts, MAX_NEW)


def test_render_prompts_drops_answer_and_ends_with_assistant_header(tokenizer, prompts):
    assert all(p.startswith("<|system|>\nBe helpful.</s>\n<|user|>\n") for p in prompts)
    assert all(p.endswith("</s>\n<|assistant|>\n") for p in prompts)
    assert not any("reference answer" in p for p in prompts)


def test_prompt_ids_have_exactly_one_bos(tokenizer, prompts):
    encoded = generation.encode_prompts(tokenizer, prompts)
    bos = tokenizer.bos_token_id
    for ids, prompt in zip(encoded, prompts, strict=True):
        assert ids[0] == bos and ids[1] != bos
        assert ids == tokenizer(prompt)["input_ids"]  # the same ids training sees for this text
    # A template that writes the BOS itself does not get a second one.
    (ids,) = generation.encode_prompts(tokenizer, ["<s>" + prompts[0]])
    assert ids[:2] == [bos, tokenizer.convert_tokens_to_ids("<|system|>")]


def test_prompts_have_very_different_lengths(tokenizer, prompts):
    lengths = [len(ids) for ids in generation.encode_prompts(tokenizer, prompts)]
    assert max(lengths) > 4 * min(lengths)


def test_batched_equals_one_at_a_time_token_ids(model, tokenizer, prompts, reference):
    tokenizer.padding_side = "right"
    batched = generation.generate_token_ids(model, tokenizer, prompts, MAX_NEW, BATCH)
    assert tokenizer.padding_side == "right"  # restored
    assert len(batched) == len(prompts)
    mismatched = [i for i, (a, b) in enumerate(zip(batched, reference, strict=True)) if a != b]
    assert not mismatched, f"prompts {mismatched} differ between batched and one-at-a-time generation"
    assert len({tuple(x) for x in reference}) > 3  # the outputs depend on the prompt, so order is checked


def test_strings_match_reference_and_are_deterministic(model, tokenizer, prompts, reference):
    first = generation.generate_batched(model, tokenizer, prompts, MAX_NEW, BATCH)
    second = generation.generate_batched(model, tokenizer, prompts, MAX_NEW, 5)  # other batch cut, same answers
    expected = generation.decode_answers(tokenizer, reference)
    assert first == second == expected
    assert first == generation.generate_one_at_a_time(model, tokenizer, prompts[:2], MAX_NEW) + first[2:]
    assert all(s == s.strip() for s in first)


def test_order_preserved_for_permuted_input(model, tokenizer, prompts, reference):
    perm = [7, 0, 11, 3, 9, 1]
    out = generation.generate_token_ids(model, tokenizer, [prompts[i] for i in perm], MAX_NEW, 3)
    assert out == [reference[i] for i in perm]


def test_negative_control_without_attention_mask_differs(model, tokenizer, prompts, reference):
    """Left padding without mask / position ids changes greedy tokens: the equality test above can fail."""
    encoded = generation.encode_prompts(tokenizer, prompts)
    pad = tokenizer.eos_token_id
    width = max(len(x) for x in encoded)
    ids = torch.tensor([[pad] * (width - len(x)) + x for x in encoded])
    with torch.inference_mode():
        logits = model(input_ids=ids).logits[:, -1]  # no mask: pads are attended, positions shifted
    wrong_first = logits.argmax(-1).tolist()
    assert any(w != r[0] for w, r in zip(wrong_first, reference, strict=True))


def test_stops_at_eos_per_row(tokenizer, prompts):
    """Make EOS win wherever the most frequent answer token would: rows stop at different steps."""
    m = _tiny_llama(tokenizer)
    ref = generation.generate_token_ids_one_at_a_time(m, tokenizer, prompts, MAX_NEW)
    common = Counter(t for ids in ref for t in ids[1:]).most_common(1)[0][0]
    with torch.no_grad():
        m.lm_head.weight[tokenizer.eos_token_id] = m.lm_head.weight[common] * 1.5
    single = generation.generate_token_ids_one_at_a_time(m, tokenizer, prompts, MAX_NEW)
    batched = generation.generate_token_ids(m, tokenizer, prompts, MAX_NEW, BATCH)
    assert batched == single
    lengths = {len(x) for x in single}
    assert min(lengths) < MAX_NEW and len(lengths) > 1, lengths
    assert all(tokenizer.eos_token_id not in x for x in batched)


def test_merge_for_inference_matches_unmerged_lora(tokenizer, prompts):
    peft = pytest.importorskip("peft")

    base = _tiny_llama(tokenizer, seed=1)
    torch.manual_seed(2)
    lora = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(
        r=4, lora_alpha=8, lora_dropout=0.0, init_lora_weights=False,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])).eval()
    encoded = generation.encode_prompts(tokenizer, prompts[:3])
    probe = torch.tensor([encoded[0]])
    with torch.inference_mode():
        lora_logits = lora(input_ids=probe).logits
        base_logits = base(input_ids=probe).logits
    assert not torch.allclose(lora_logits, base_logits, atol=1e-3)  # the adapter really changes the model
    unmerged = generation.generate_token_ids(lora, tokenizer, prompts, MAX_NEW, BATCH)

    merged = generation.merge_for_inference(lora)
    assert not isinstance(merged, peft.PeftModel) and not merged.training
    with torch.inference_mode():
        assert torch.allclose(merged(input_ids=probe).logits, lora_logits, atol=1e-4)
    merged_ids = generation.generate_token_ids(merged, tokenizer, prompts, MAX_NEW, BATCH)
    assert merged_ids == unmerged
    assert merged_ids != generation.generate_token_ids(base, tokenizer, prompts, MAX_NEW, BATCH)


def test_merge_for_inference_plain_model_is_returned_in_eval_mode(tokenizer):
    m = _tiny_llama(tokenizer).train()
    assert generation.merge_for_inference(m) is m and not m.training


def test_empty_prompt_list(model, tokenizer):
    assert generation.generate_batched(model, tokenizer, [], MAX_NEW, BATCH) == []


def test_auto_batch_size_fits_the_kv_cache_in_half_the_free_gpu_memory(model, tokenizer, prompts, reference, caplog):
    """eval.batch_size=0: 32 rows on CPU; on a GPU the rows whose KV cache fits half the free memory, at most 256.
    The tiny model: 2 layers x 2 KV heads x 16 dims x keys+values x 4 bytes = 512 bytes per token."""
    assert generation.kv_bytes_per_token(model) == 2 * 2 * 2 * 16 * 4
    assert generation.auto_batch_size(model, 100, None) == generation.CPU_BATCH == 32
    assert generation.auto_batch_size(model, 100, 2 * 512 * 100 * 7 + 1) == 7  # 7 rows of 100 tokens in half
    assert generation.auto_batch_size(model, 100, 10**15) == 256  # capped
    assert generation.auto_batch_size(model, 100, 1000) == 1  # never 0
    with caplog.at_level("INFO", logger="tasks.ml.generation"):
        auto = generation.generate_token_ids(model, tokenizer, prompts, MAX_NEW, 0)
    assert auto == reference and "generation batch: 32 prompts (eval.batch_size=0, auto" in caplog.text
    with pytest.raises(ValueError, match="batch_size must be >= 0"):
        generation.generate_token_ids(model, tokenizer, prompts, MAX_NEW, -1)
