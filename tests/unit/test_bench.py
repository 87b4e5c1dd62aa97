"""The parts of bench/ that decide whether a GPU figure can be trusted: the time budgets of bench/gpu.sh and the chat
suite's account of the decode path the service really ran. (The whole script, rehearsed on CPU:
tests/integration/test_bench_rehearsal.py.)"""

import re
from types import SimpleNamespace

import pytest

from tests.conftest import REPO

torch = pytest.importorskip("torch")


def gpu_script_defaults() -> dict:
    """bench/gpu.sh's default budgets: NAME=${BENCH_NAME:-seconds}."""
    script = (REPO / "bench" / "gpu.sh").read_text()
    return {k: int(v) for k, v in re.findall(r"^(\w+)=\$\{BENCH_\w+:-(\d+)\}", script, re.M)}


def test_the_budgets_of_the_gpu_script_leave_two_minutes_of_a_600s_device_call():
    d = gpu_script_defaults()
    assert set(d) == {"TRAIN_S", "EVAL_S", "HPO_S", "CHAT_S", "QUALITY_S", "DEADLINE_S"}
    assert d["TRAIN_S"] + d["EVAL_S"] + d["HPO_S"] + d["CHAT_S"] + d["QUALITY_S"] <= 450
    assert d["DEADLINE_S"] <= 600 - 120


def test_a_failed_compiled_decode_step_is_reported_as_an_eager_fallback():
    """A compiled step that fails decodes eagerly from then on (same tokens); the chat bench must say so, or eager
    tokens/s would pass for the compiled GPU path."""
    from bench.chat_app import decoder_report
    from tasks.chat import static_cache as static
    from tasks.chat.engine import ModelHandle
    from tasks.config import Config
    from tasks.demo import datagen
    from tasks.demo import model as demo_model

    rows = datagen.generate_rows(40, seed=1)
    tokenizer = demo_model.build_tokenizer([r["instruction"] for r in rows] + [r["response"] for r in rows],
                                           vocab_size=512)
    model = demo_model.build_model(tokenizer, size="tiny").eval()
    cfg = Config()
    cfg.chat.static_cache, cfg.chat.compile = "on", "on"
    decoder = static.StaticDecoder(model, rows=2, width=64)

    def broken_compiled_step(ids, pos):
        raise RuntimeError("the compiler gave up")

    decoder.compiled = broken_compiled_step  # what torch.compile returned; it fails on its first call
    handle = ModelHandle(tokenizer, model, "v1", {})
    handle.decoder = decoder
    state = SimpleNamespace(handle=handle, cfg=cfg, generator=SimpleNamespace(steps=0))
    before = decoder_report(state)
    assert before["path"] == "static cache, compiled (CPU: no CUDA graphs)"
    assert before["eager_fallbacks"] == 0 and before["as_configured"] is True

    tokens = decoder.step([5, 6], [0, 0])
    assert tokens == static.StaticDecoder(model, rows=2, width=64).step([5, 6], [0, 0])  # the reply goes on
    after = decoder_report(state)
    assert after["eager_fallbacks"] == 1 and decoder.fallbacks == 1
    assert after["path"] == "static cache, eager" and after["compiled"] is False and after["as_configured"] is False

    handle.decoder = None  # a failed warm-up: the version decodes with the dynamic cache
    gone = decoder_report(state)
    assert gone["path"] == "dynamic cache, eager" and gone["eager_fallbacks"] == 1 and gone["as_configured"] is False
