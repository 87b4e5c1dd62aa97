"""Label masking and batching of the training path (no services)."""

import pytest

from tasks.demo import datagen
from tasks.ml.training import IGNORE, Example, encode, epoch_batches, total_steps


@pytest.fixture(scope="module")
def tokenizer():
    from tasks.demo import model as demo_model

    rows = datagen.generate_rows(200, seed=2)
    return demo_model.build_tokenizer([r["instruction"] for r in rows] + [r["response"] for r in rows],
                                      vocab_size=512)


def conversation(user="Where is my order {{Order Number}}?", answer="It ships today.\n1. Open Orders.\n2. Track."):
    return [{"role": "system", "content": "You are helpful."}, {"role": "user", "content": user},
            {"role": "assistant", "content": answer}]


def test_only_assistant_tokens_carry_labels(tokenizer):
    ex = encode(tokenizer, conversation(), max_len=512)
    labelled = [t for t, lab in zip(ex.input_ids, ex.labels, strict=True) if lab != IGNORE]
    assert tokenizer.decode(labelled) == "It ships today.\n1. Open Orders.\n2. Track." + tokenizer.eos_token
    first = ex.labels.index(next(lab for lab in ex.labels if lab != IGNORE))
    prompt = tokenizer.decode(ex.input_ids[:first])
    assert "<|user|>\nWhere is my order {{Order Number}}?" in prompt
    assert prompt.endswith("<|assistant|>\n")
    assert all(lab == IGNORE for lab in ex.labels[:first])  # system and user tokens are masked
    assert [lab for lab in ex.labels if lab != IGNORE] == labelled  # labels equal the input ids they sit on


def test_truncation_keeps_examples_with_answer_tokens(tokenizer):
    long_user = "please help " * 200
    assert encode(tokenizer, conversation(user=long_user), max_len=64) is None  # no answer token left
    ex = encode(tokenizer, conversation(), max_len=40)
    assert ex is not None and len(ex.input_ids) == 40


def test_length_grouped_batches_are_deterministic_and_cover_everything():
    examples = [Example([1] * n, [1] * n) for n in range(5, 205)]
    a = epoch_batches(examples, 8, seed=3, epoch=0)
    assert a == epoch_batches(examples, 8, seed=3, epoch=0)
    assert a != epoch_batches(examples, 8, seed=3, epoch=1)
    assert sorted(i for b in a for i in b) == list(range(200))
    # length grouping: inside a batch lengths are close, so padding is small
    waste = sum(max(len(examples[i].input_ids) for i in b) * len(b) - sum(len(examples[i].input_ids) for i in b)
                for b in a)
    assert waste / sum(len(e.input_ids) for e in examples) < 0.05


def test_total_steps_from_epochs_or_max_steps():
    from tasks.config import Config

    t = Config().training
    t.batch_size, t.epochs, t.max_steps = 10, 2.0, 0
    assert total_steps(95, t) == 20
    t.max_steps = 7
    assert total_steps(95, t) == 7


def _bos_writing(tokenizer):
    """The same tokenizer with a chat template that writes its own BOS (as Llama-2-style templates do)."""
    import copy

    other = copy.deepcopy(tokenizer)
    other.chat_template = "{{ bos_token }}" + tokenizer.chat_template
    return other


@pytest.mark.parametrize("template", ["tinyllama", "writes-bos"])
def test_prompt_ids_in_training_equal_what_generation_and_chat_feed_the_model(tokenizer, template):
    """The prompt part of a training example is token for token what evaluation (generation.encode_prompts) and the
    chat service (prompting.encode_conversation) put in front of the answer: one BOS, never two."""
    from tasks.chat.prompting import encode_conversation
    from tasks.demo import model as demo_model
    from tasks.ml import generation

    tok = tokenizer if template == "tinyllama" else _bos_writing(tokenizer)
    assert tokenizer.chat_template == demo_model.ZEPHYR_CHAT_TEMPLATE  # TinyLlama-1.1B-Chat's template, verbatim
    messages = conversation()
    ex = encode(tok, messages, max_len=512)
    first_label = next(i for i, lab in enumerate(ex.labels) if lab != IGNORE)
    training_prompt = ex.input_ids[:first_label]
    rendered = generation.render_prompts(tok, [messages])
    assert training_prompt == generation.encode_prompts(tok, rendered)[0]
    assert training_prompt == encode_conversation(tok, messages[:-1])
    assert training_prompt.count(tok.bos_token_id) == 1 and training_prompt[0] == tok.bos_token_id
