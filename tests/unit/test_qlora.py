"""QLoRA and mixed-precision LoRA training on CPU: a tiny Llama quantized to NF4 by bitsandbytes (its CPU path is
slow but real; the fine-tune step itself refuses NF4 without CUDA), trained a few steps by training.fit under bf16
autocast, as on a GPU."""

import pytest

from tasks.config import Config
from tasks.demo import datagen
from tasks.ml.training import encode
from tests.conftest import save_tiny_model

torch = pytest.importorskip("torch")
pytest.importorskip("bitsandbytes")


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    # bitsandbytes' CPU kernel packs output features in blocks of 32: the tiny MLP width (176) is not a multiple
    return save_tiny_model(tmp_path_factory.mktemp("tiny-qlora"), 80, seed=3, intermediate_size=192)


@pytest.fixture(scope="module")
def examples(base_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    rows = datagen.generate_rows(12, seed=9)
    return [encode(tokenizer, [{"role": "user", "content": r["instruction"]},
                               {"role": "assistant", "content": r["response"]}], max_len=256) for r in rows]


def config(**training) -> Config:
    cfg = Config()
    cfg.lora.quantization = "nf4"
    cfg.training.batch_size, cfg.training.learning_rate = 4, 3e-3
    for key, value in training.items():
        setattr(cfg.training, key, value)
    return cfg


def quantized(base_dir):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16,
                           bnb_4bit_use_double_quant=True)
    model = AutoModelForCausalLM.from_pretrained(base_dir, quantization_config=q, dtype=torch.bfloat16,
                                                 device_map={"": "cpu"})
    model.config.use_cache = False
    return model


def lora_inputs(model) -> list:
    """Record the dtype of what enters every LoRA A matrix."""
    seen = []
    for name, module in model.named_modules():
        if name.endswith("lora_A.default"):
            module.register_forward_hook(lambda m, args, out: seen.append(args[0].dtype))
    return seen


def test_qlora_keeps_the_base_in_the_compute_dtype_and_trains_only_the_adapter(base_dir, examples):
    """No fp32 upcast of the 4-bit base's other weights (peft's prepare_model_for_kbit_training made embeddings, norms
    and the output head fp32); gradient checkpointing on; the adapter learns and the base does not move."""
    from tasks.ml import models
    from tasks.ml.training import TrainState, fit, make_optimizer

    cfg = config(gradient_checkpointing=True)
    model = models.add_lora(quantized(base_dir), cfg, seed=0)
    base = {n: p for n, p in model.named_parameters() if "lora_" not in n}
    assert {p.dtype for p in base.values()} == {torch.bfloat16, torch.uint8}  # 4-bit packed + bf16, no fp32
    assert not any(p.requires_grad for p in base.values())
    assert all(p.requires_grad for n, p in model.named_parameters() if "lora_" in n)
    assert model.is_gradient_checkpointing
    before = {n: p.detach().clone() for n, p in model.named_parameters()}

    seen = lora_inputs(model)
    opt, sched = make_optimizer(model, cfg.training, 2)
    state = fit(model, examples, cfg.training, 2, TrainState(), opt, sched, pad_id=2, device="cpu",
                dtype=torch.bfloat16)
    assert state.step == 2 and all(loss == loss and 0 < loss < 20 for _, loss, _ in state.losses)
    after = dict(model.named_parameters())
    assert all(not torch.equal(before[n], after[n]) for n in before if "lora_B" in n)  # B starts at 0: it moved
    assert all(torch.equal(before[n], after[n]) for n in base)
    # forward, and the forward again under checkpointing in the backward: the adapters see bf16, no fp32 copies
    assert seen and set(seen) == {torch.bfloat16}


def test_the_input_casts_are_off_only_inside_fit_and_the_losses_match(base_dir, examples):
    """Under bf16 autocast fit turns peft's per-module fp32 input casts off; outside fit (validation) they are on
    again. The training losses equal those of a run that keeps the casts, within bf16 rounding."""
    from tasks.ml import models
    from tasks.ml.training import NoInputCasts, TrainState, fit, make_optimizer, validation_loss

    cfg = config()
    cfg.lora.dropout = 0.0  # dropout draws would differ between the two runs' dtypes

    def run(keep_casts: bool):
        model = models.add_lora(quantized(base_dir), cfg, seed=0)
        seen = lora_inputs(model)
        opt, sched = make_optimizer(model, cfg.training, 2)
        with pytest.MonkeyPatch.context() as mp:
            if keep_casts:  # the old behaviour, for the comparison
                mp.setattr(NoInputCasts, "__enter__", lambda self: None)
            state = fit(model, examples, cfg.training, 2, TrainState(), opt, sched, pad_id=2, device="cpu",
                        dtype=torch.bfloat16)
        return model, state, seen

    model, state, seen = run(keep_casts=False)
    assert set(seen) == {torch.bfloat16}
    seen.clear()
    validation_loss(model, examples[:4], 4, 1, 2, "cpu")  # no autocast here: peft casts to the adapter's fp32
    assert set(seen) == {torch.float32}
    _, kept, seen_kept = run(keep_casts=True)
    assert set(seen_kept) == {torch.float32}
    torch.testing.assert_close([x[1] for x in state.losses], [x[1] for x in kept.losses], rtol=2e-2, atol=2e-2)
