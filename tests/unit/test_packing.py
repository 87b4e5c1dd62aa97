"""Packed training rows: no attention across conversation boundaries, labels and positions per conversation, and
the same loss as unpacked training (tiny Llama built here, CPU, no services)."""

import sys
from contextlib import contextmanager

import pytest

from tasks.config import Config
from tasks.demo import datagen
from tasks.ml.training import (
    IGNORE,
    Batching,
    Example,
    collate,
    collate_packed,
    encode,
    pack_rows,
    packed_inputs,
    plan_batching,
    register_varlen_attention,
)

torch = pytest.importorskip("torch")


@pytest.fixture(scope="module")
def tokenizer():
    from tasks.demo import model as demo_model

    rows = datagen.generate_rows(80, seed=3)
    return demo_model.build_tokenizer([r["instruction"] for r in rows] + [r["response"] for r in rows],
                                      vocab_size=512)


@pytest.fixture(scope="module")
def model(tokenizer):
    """A tiny random Llama with LoRA on every projection, its B matrices non-zero so the adapter matters."""
    from tasks.demo import model as demo_model
    from tasks.ml import models

    base = demo_model.build_model(tokenizer, size="tiny")
    base.config.use_cache = False
    m = models.add_lora(base, Config(), seed=0)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02, generator=torch.Generator().manual_seed(len(name)))
    return m.eval()


@pytest.fixture(scope="module")
def examples(tokenizer):
    rows = datagen.generate_rows(12, seed=9)
    msgs = [[{"role": "system", "content": "You are helpful."}, {"role": "user", "content": r["instruction"]},
             {"role": "assistant", "content": r["response"]}] for r in rows]
    return [encode(tokenizer, m, max_len=256) for m in msgs]


def _logits(model, **inputs):
    with torch.no_grad():
        return model(**inputs).logits


def _alone(model, ex):
    ids = torch.tensor([ex.input_ids])
    return _logits(model, input_ids=ids, attention_mask=torch.ones_like(ids))[0]


@contextmanager
def attention(model, impl):
    """The model's attention switched to what training uses for `impl` (as fit does), then back."""
    base = model.get_base_model()
    base.set_attn_implementation(register_varlen_attention() if impl == "varlen_sdpa" else impl)
    try:
        yield
    finally:
        base.set_attn_implementation("sdpa")


@pytest.mark.parametrize("impl", ["varlen_sdpa", "sdpa", "eager"])
def test_a_token_never_attends_to_another_conversation(model, examples, impl):
    a, b, c = examples[:3]
    na, nb = len(a.input_ids), len(b.input_ids)
    alone_a, alone_b = _alone(model, a), _alone(model, b)
    # two rows: [a b pad*7] and [other b]; another first conversation (other tokens, other length) must leave the
    # second one's logits untouched
    other = Example(list(reversed(c.input_ids)), c.labels)
    no = len(other.input_ids)
    packed = collate_packed([a, b, other], [[0, 1], [2, 1]], 2, max(na, no) + nb + 7, pad_id=2)
    inputs = {k: v for k, v in packed_inputs(packed, impl, "cpu").items() if k != "labels"}
    with attention(model, impl):
        out = _logits(model, **inputs)
    torch.testing.assert_close(out[0, :na], alone_a, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out[0, na:na + nb], alone_b, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out[1, no:no + nb], alone_b, rtol=1e-4, atol=1e-4)


def test_flex_attention_block_mask_isolates_conversations(model, examples):
    pytest.importorskip("torch.nn.attention.flex_attention")
    a, b = examples[3:5]
    packed = collate_packed([a, b], [[0, 1]], 1, 128 * ((len(a.input_ids) + len(b.input_ids)) // 128 + 1), 2)
    inputs = {k: v for k, v in packed_inputs(packed, "flex_attention", "cpu").items() if k != "labels"}
    with attention(model, "flex_attention"):
        try:
            out = _logits(model, **inputs)[0]
        except Exception as exc:  # noqa: BLE001 -- flex on CPU depends on the torch build
            pytest.skip(f"flex_attention does not run on this CPU build: {exc}")
    na = len(a.input_ids)
    torch.testing.assert_close(out[na:na + len(b.input_ids)], _alone(model, b), rtol=1e-4, atol=1e-4)


def test_positions_restart_and_labels_stop_at_each_boundary(examples):
    a, b = examples[:2]
    na, nb = len(a.input_ids), len(b.input_ids)
    p = collate_packed([a, b], [[0, 1], []], 2, na + nb + 5, pad_id=2)
    assert p["position_ids"][0, :na].tolist() == list(range(na))
    assert p["position_ids"][0, na:na + nb].tolist() == list(range(nb))  # restarts at the boundary
    assert p["seq_ids"][0].tolist() == [0] * na + [1] * nb + [2] * 5
    labels = p["labels"][0].tolist()
    assert labels[:na] == [IGNORE] + a.labels[1:]
    assert labels[na] == IGNORE  # the last token of a never learns to predict b's first token
    assert labels[na + 1:na + nb] == b.labels[1:]
    assert labels[na + nb:] == [IGNORE] * 5 and p["input_ids"][0, na + nb:].tolist() == [2] * 5
    assert all(x == IGNORE for x in p["labels"][1].tolist())  # a padding row teaches nothing
    # with the model's shift (logit t predicts label t+1) the only targets are each conversation's own labels
    targets = [(t, labels[t + 1]) for t in range(len(labels) - 1) if labels[t + 1] != IGNORE]
    assert all(t + 1 < na or na < t + 1 < na + nb for t, _ in targets)


def test_packed_loss_equals_unpacked_loss(model, examples):
    ids, mask, labels = collate(examples, list(range(len(examples))), pad_id=2, device="cpu")
    with torch.no_grad():
        unpacked = model(input_ids=ids, attention_mask=mask, labels=labels).loss
    rows = pack_rows([len(e.input_ids) for e in examples], 512)
    assert len(rows) < len(examples)  # several conversations per row
    packed = collate_packed(examples, rows, len(rows) + 1, 512, pad_id=2)  # + one padding row
    for impl in ("varlen_sdpa", "sdpa"):
        with torch.no_grad(), attention(model, impl):
            loss = model(**packed_inputs(packed, impl, "cpu")).loss
        torch.testing.assert_close(loss, unpacked, rtol=1e-5, atol=1e-5)


def test_packed_epochs_cover_every_conversation_once_in_fixed_shapes():
    examples = [Example([1] * n, [1] * n) for n in [30, 250, 480, 90, 512, 17, 333, 64] * 25]
    tcfg = Config().training
    tcfg.batch_size = 16
    b = plan_batching(examples, tcfg, "cpu")
    assert b.packing and b.pack_length == 512 and b.rows_per_step >= 1
    steps = b.epoch(examples, seed=1, epoch=0)
    assert steps == b.epoch(examples, seed=1, epoch=0) and steps != b.epoch(examples, seed=1, epoch=1)
    assert sorted(i for rows in steps for row in rows for i in row) == list(range(len(examples)))
    assert all(len(rows) == b.rows_per_step for rows in steps[:-1]) and 0 < len(steps[-1]) <= b.rows_per_step
    assert all(sum(len(examples[i].input_ids) for i in row) <= 512 for rows in steps for row in rows)
    filled = sum(len(e.input_ids) for e in examples) / (sum(len(r) for r in steps) * 512)
    assert filled > 0.9  # best-fit packing leaves little room unused
    # a conversation longer than the configured row widens the rows; packing off keeps padded batches
    tcfg.pack_length = 128
    assert plan_batching(examples, tcfg, "cpu").pack_length == 512
    tcfg.packing = False
    assert plan_batching(examples, tcfg, "cpu") == Batching(False, 16)


def test_flash_attention_gets_one_flat_row_with_restarting_positions(examples):
    a, b = examples[:2]
    p = collate_packed([a, b], [[0], [1]], 2, 256, pad_id=2)
    inputs = packed_inputs(p, "flash_attention_2", "cpu")
    assert "attention_mask" not in inputs and inputs["input_ids"].shape == (1, 512)
    pos = inputs["position_ids"][0].tolist()
    assert pos[:len(a.input_ids)] == list(range(len(a.input_ids))) and pos[256] == 0


def test_varlen_attention_leaves_padded_batches_to_sdpa(model, examples):
    """Validation batches inside fit() are right-padded with a 2D mask: same logits as plain SDPA."""
    ids, mask, _ = collate(examples[:4], [0, 1, 2, 3], pad_id=2, device="cpu")
    expected = _logits(model, input_ids=ids, attention_mask=mask)
    with attention(model, "varlen_sdpa"):
        got = _logits(model, input_ids=ids, attention_mask=mask)
    real = mask.bool()
    torch.testing.assert_close(got[real], expected[real], rtol=1e-5, atol=1e-5)


def test_fit_trains_packed_rows_deterministically(tokenizer, examples):
    from tasks.demo import model as demo_model
    from tasks.ml import models
    from tasks.ml.training import TrainState, fit, make_optimizer

    cfg = Config()
    cfg.training.batch_size, cfg.training.learning_rate = 4, 3e-3

    def run():
        base = demo_model.build_model(tokenizer, size="tiny")
        base.config.use_cache = False
        m = models.add_lora(base, cfg, seed=0)
        opt, sched = make_optimizer(m, cfg.training, 3)
        state = fit(m, examples, cfg.training, 3, TrainState(), opt, sched, pad_id=2, device="cpu",
                    dtype=torch.float32)
        return m, state

    m, state = run()
    assert m.config._attn_implementation == "sdpa"  # fit switched to varlen attention and back
    plan = plan_batching(examples, cfg.training, "cpu")
    assert state.step == 3 and 0 < state.tokens <= state.slots
    assert state.slots == 3 * plan.rows_per_step * plan.pack_length  # every step has the same shape
    assert [x[1] for x in state.losses] == [x[1] for x in run()[1].losses]


@pytest.mark.parametrize("packing", [True, False])
def test_fit_reads_the_losses_from_the_device_only_when_somebody_looks(tokenizer, examples, monkeypatch, packing):
    """No device sync per step in fit: no tensor is read into Python by tasks/ code during the steps (a .item() per
    step makes the CPU wait for the GPU every step); the losses arrive in one read at the end, when the progress line
    is not due and nobody asks (on_step flushes only when it wants them). Seen on CPU by recording the reads."""
    from tasks.demo import model as demo_model
    from tasks.ml import models
    from tasks.ml.training import TrainState, fit, make_optimizer

    cfg = Config()
    cfg.training.batch_size, cfg.training.learning_rate, cfg.training.log_every_s = 4, 3e-3, 3600
    cfg.training.packing, cfg.training.packed_attention = packing, "sdpa"  # sdpa: the mask path reads nothing either
    base = demo_model.build_model(tokenizer, size="tiny")
    base.config.use_cache = False
    m = models.add_lora(base, cfg, seed=0)
    opt, sched = make_optimizer(m, cfg.training, 4)
    reads = []
    for name in ("item", "tolist", "__float__", "__int__", "__bool__"):
        def spy(self, *args, _name=name, _real=getattr(torch.Tensor, name)):
            caller = sys._getframe(1).f_globals.get("__name__", "")
            if caller.startswith("tasks."):
                reads.append((_name, caller))
            return _real(self, *args)
        monkeypatch.setattr(torch.Tensor, name, spy)

    def on_step(st, losses):
        if st.step == 2:
            assert losses.flush() == st.losses[-1][1] and len(st.losses) == 2  # asked for: read now
        return False

    state = fit(m, examples, cfg.training, 4, TrainState(), opt, sched, pad_id=2, device="cpu", dtype=torch.float32,
                on_step=on_step)
    monkeypatch.undo()
    # two reads in four steps: on_step's at step 2, then the last step's progress line (steps 3 and 4 at once)
    assert reads == [("tolist", "tasks.ml.training")] * 2, reads
    assert [x[0] for x in state.losses] == [1, 2, 3, 4] and all(isinstance(x[1], float) for x in state.losses)


def _fit_watching_layers(tokenizer, examples, cfg, steps=2):
    """fit on a fresh tiny 3-layer LoRA model; returns (model, state, [compiled? per layer] seen at every step)."""
    from tasks.demo import model as demo_model
    from tasks.ml import models
    from tasks.ml.training import TrainState, decoder_layers, fit, make_optimizer

    base = demo_model.build_model(tokenizer, size="tiny", num_layers=3)
    base.config.use_cache = False
    m = models.add_lora(base, cfg, seed=0)
    opt, sched = make_optimizer(m, cfg.training, steps)
    seen = []

    def on_step(st, losses):
        seen.append([layer._compiled_call_impl is not None for layer in decoder_layers(m)])
        return False

    state = fit(m, examples, cfg.training, steps, TrainState(), opt, sched, pad_id=2, device="cpu",
                dtype=torch.float32, on_step=on_step)
    return m, state, seen


def test_regional_compile_compiles_every_decoder_layer_with_one_graph_and_trains_like_eager(
        tokenizer, examples, monkeypatch):
    """training.compile compiles each decoder layer (not the whole model); the identical layers share one compiled
    graph; losses and trained weights match eager training; fit hands the model back with eager layers. On CPU
    fit never compiles on its own: the CUDA/length checks are bypassed here to run the real inductor on CPU."""
    from torch._dynamo.utils import counters

    from tasks.ml.training import RegionalCompile, decoder_layers

    cfg = Config()
    cfg.training.batch_size, cfg.training.learning_rate = 4, 3e-3
    cfg.lora.dropout = 0.0  # dropout draws differ between eager and inductor code; without it the runs must agree
    cfg.training.packed_attention = "sdpa"  # a 4D mask: varlen_sdpa splits by data-dependent sizes (graph breaks)
    eager, eager_state, eager_seen = _fit_watching_layers(tokenizer, examples, cfg)
    assert eager_seen == [[False] * 3] * 2  # on CPU fit does not compile

    torch._dynamo.reset()
    counters.clear()
    monkeypatch.setattr(RegionalCompile, "_skip_reason", staticmethod(lambda *args: None))
    compiled, state, seen = _fit_watching_layers(tokenizer, examples, cfg)
    assert seen == [[True] * 3] * 2  # every decoder layer ran compiled, at every step
    assert counters["stats"]["unique_graphs"] == 1  # one graph for all three layers (regional compilation)
    assert not any(layer._compiled_call_impl is not None for layer in decoder_layers(compiled))  # eager again
    assert [n for n, _ in compiled.named_parameters()] == [n for n, _ in eager.named_parameters()]  # same names
    torch.testing.assert_close([x[1] for x in state.losses], [x[1] for x in eager_state.losses], rtol=1e-4, atol=1e-5)
    trained = {n: p for n, p in compiled.named_parameters() if p.requires_grad}
    for name, p in eager.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(trained[name], p, rtol=1e-3, atol=1e-5)


@pytest.mark.parametrize("impl", ["padded", "varlen_sdpa", "sdpa"])
def test_labelled_loss_equals_the_models_loss_and_gradients(model, examples, impl):
    """Training's loss applies the output head to the labelled (assistant) positions only: same loss and same LoRA
    gradients as the model's own loss over all logits, padded or packed, and the head sees only labelled rows."""
    from tasks.ml.training import labelled_loss

    if impl == "padded":
        ids, mask, labels = collate(examples, list(range(len(examples))), pad_id=2, device="cpu")
        inputs = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    else:
        rows = pack_rows([len(e.input_ids) for e in examples], 512)
        inputs = packed_inputs(collate_packed(examples, rows, len(rows) + 1, 512, pad_id=2), impl, "cpu")
    head_rows = []
    hook = model.get_output_embeddings().register_forward_hook(
        lambda module, args, out: head_rows.append(args[0].shape[:-1].numel()))
    lora = [p for n, p in model.named_parameters() if "lora_" in n]
    results = []
    try:
        with attention(model, impl if impl != "padded" else "sdpa"):
            for loss_of in (lambda: model(**inputs).loss, lambda: labelled_loss(model, inputs)):
                model.zero_grad(set_to_none=True)
                loss = loss_of()
                loss.backward()
                results.append((loss.detach(), [p.grad.clone() for p in lora]))
    finally:
        hook.remove()
        model.zero_grad(set_to_none=True)
    (full, full_grads), (labelled, grads) = results
    torch.testing.assert_close(labelled, full, rtol=1e-5, atol=1e-6)
    for a, b in zip(grads, full_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    n_labelled = int((inputs["labels"][:, 1:] != IGNORE).sum())
    assert head_rows == [inputs["labels"].numel(), n_labelled]  # all positions, then only the labelled ones
    assert 0 < n_labelled < inputs["labels"].numel()
