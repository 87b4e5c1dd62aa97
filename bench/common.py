"""What the benchmark suites share: real conversations, the model under test, devices, timers and peak memory.

Models: on CPU the demo-size Llama (tasks/demo_model.py, random init: throughput does not depend on the weights);
on CUDA TinyLlama-1.1B-Chat when its weights are in the local Hugging Face cache, else a random-init model of its
shape (22 layers, d 2048, 32 heads, 4 KV heads, FFN 5632, vocab 32000). Without TinyLlama's tokenizer, the demo
tokenizer (byte-level BPE trained on the shop's texts, TinyLlama's chat template) renders the conversations, so
token lengths stay close to the real ones (Bitext mean ~250 tokens either way).
"""

from __future__ import annotations

import gc
import json
import math
import os
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
VAL_BATCHES = 2  # validation batches of 8 held-out conversations (the same for every bench train recipe)
# ../shared does not travel to a GPU machine: copy the sample to bench/out/ (ignored) and carry it there.
BITEXT_CANDIDATES = [Path(os.environ["ECB_BITEXT_CSV"])] if os.environ.get("ECB_BITEXT_CSV") else []
BITEXT_CANDIDATES += [REPO.parent / "shared" / "data" / "bitext_customer_support_sample.csv",
                      REPO / "bench" / "out" / "bitext_customer_support_sample.csv"]
TINYLLAMA = "TinyLlama/TinyLlama-1.1B-Chat-v1.0"
TINYLLAMA_SHAPE = dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                       num_key_value_heads=4, vocab_size=32000, max_position_embeddings=2048)


def table(rows: list[dict]) -> str:
    cols = list(dict.fromkeys(c for r in rows for c in r))
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        cells = []
        for c in cols:
            v = r.get(c, "")
            cells.append(f"{v:,.0f}" if isinstance(v, float) and abs(v) >= 100 else
                         f"{v:.3f}" if isinstance(v, float) else str(v))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def bitext_path() -> Path | None:
    return next((p for p in BITEXT_CANDIDATES if p.exists()), None)


def conversations(n: int | None = None) -> tuple[list[dict], str]:
    """ChatML conversations from the real Bitext sample (tasks/chatml.py's row cleaning and conversion), else from
    the demo generator; returns (records, source)."""
    from tasks.config import Config
    from tasks.data import chatml
    from tasks.demo import datagen

    cfg = Config().data
    path = bitext_path()
    if path is not None:
        records, _, _ = chatml.read_rows(path.name, path.read_bytes(), cfg)
        source = f"Bitext sample ({path.name}, {len(records)} rows)"
    else:
        records, _, _ = chatml.read_rows("demo.csv", datagen.to_csv_bytes(datagen.generate_rows(n or 600, 0)), cfg)
        source = "demo generator (Bitext sample not found)"
    chat = [chatml.to_chatml(r, cfg.system_prompt) for r in records]
    return (chat[:n] if n else chat), source


def demo_tokenizer(vocab_size: int = 2048):
    """The demo base model's tokenizer (same builder as `make demo`), trained on generated shop texts."""
    from tasks.demo import datagen
    from tasks.demo import model as dm

    rows = datagen.generate_rows(800, seed=0)
    return dm.build_tokenizer([r["instruction"] for r in rows] + [r["response"] for r in rows], vocab_size=vocab_size)


def resolve_device(name: str) -> str:
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device here")
    return name


def device_name(device: str) -> str:
    import platform

    import torch

    if device == "cuda":
        return torch.cuda.get_device_name()
    name = platform.processor() or platform.machine()
    try:
        name = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                    if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"CPU {name} ({os.cpu_count()} cores), {torch.get_num_threads()} thread(s)"


def versions() -> dict:
    import peft
    import torch
    import transformers

    return {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__}


def model_dir(device: str, work: Path, smoke: bool = False) -> tuple[str, str]:
    """(folder of the base model + tokenizer in Hugging Face format, description) for this device; ``smoke``
    (CPU only): the tiny test-size Llama, for the rehearsal that only checks every code path runs."""
    import torch

    from tasks.demo import model as dm

    if device != "cuda":
        size = "tiny" if smoke else "demo"
        folder = work / f"{size}-llama"
        if not (folder / "config.json").exists():
            tok = demo_tokenizer(512 if smoke else 2048)
            model = dm.build_model(tok, size=size)
            model.save_pretrained(folder)
            tok.save_pretrained(folder)
        return str(folder), ("tiny Llama (2 layers, d 64, random init), demo tokenizer" if smoke
                             else "demo-size Llama (4 layers, d 192, random init), demo tokenizer")
    real = tinyllama_cached()
    if real:
        return real, f"{TINYLLAMA} (local cache)"
    folder = work / "tinyllama-shape"
    if not (folder / "config.json").exists():
        from transformers import LlamaConfig, LlamaForCausalLM

        tok = demo_tokenizer()
        cfg = LlamaConfig(**TINYLLAMA_SHAPE, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                          pad_token_id=tok.pad_token_id, tie_word_embeddings=False, rms_norm_eps=1e-5)
        torch.manual_seed(0)
        with torch.device("cuda"):
            model = LlamaForCausalLM(cfg).to(torch.bfloat16)
        with torch.no_grad():  # the random model then only "says" tokens the demo tokenizer can print (chat suite)
            model.lm_head.weight[len(tok):] = 0
        model.save_pretrained(folder)
        tok.save_pretrained(folder)
        del model
        free_memory()
    return str(folder), "TinyLlama-1.1B shape (22 layers, d 2048, random init, bf16 on disk), demo tokenizer"


def tinyllama_cached() -> str | None:
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(TINYLLAMA, local_files_only=True)
    except Exception:  # noqa: BLE001 -- not cached (or no hub client): use the random-init shape
        return None


def free_memory() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _malloc_trim() -> None:
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _proc_status(key: str) -> float:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 2**20  # kB -> GiB
    except OSError:
        pass
    return float("nan")


class PeakMemory:
    """Peak memory of a block. CUDA: max_memory_allocated (everything allocated, models alive before included).
    CPU: how far the process's resident memory rose above its level at the start of the block (peak RSS, VmHWM,
    reset through /proc/self/clear_refs), so recipes built side by side are measured apart."""

    def __init__(self, device: str):
        self.device, self.gib, self.base = device, float("nan"), 0.0

    def __enter__(self):
        import torch

        free_memory()
        if self.device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        else:
            _malloc_trim()  # hand freed heap back, so the baseline is what is really in use
            try:
                Path("/proc/self/clear_refs").write_text("5")
            except OSError:
                pass
            self.base = _proc_status("VmRSS")
        return self

    def read(self) -> float:
        import torch

        if self.device == "cuda":
            return torch.cuda.max_memory_allocated() / 2**30
        return _proc_status("VmHWM") - self.base

    def __exit__(self, *exc):
        self.gib = self.read()
        return False


def sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def now(device: str) -> float:
    sync(device)
    return time.perf_counter()


def write_json(out: Path, name: str, result: dict) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}.json"
    path.write_text(json.dumps(result, indent=2, default=str))
    return path


class Budget:
    """A suite's time budget (``--budget-s``; 0 = none): what is left decides whether the next recipe or section
    starts, so a suite ends on its own, with its JSON written, before bench/gpu.sh's hard time limit kills it."""

    def __init__(self, seconds: float):
        self.end = time.monotonic() + seconds if seconds > 0 else math.inf

    def left(self) -> float:
        return self.end - time.monotonic()

    def allows(self, need_s: float) -> bool:
        return self.left() >= need_s

    def skipped(self, what: str, need_s: float) -> dict:
        return {"skipped": f"{what}: ~{need_s:.0f}s needed, {max(self.left(), 0):.0f}s of the suite's budget left"}


def dynamo_graphs() -> int:
    """Graphs torch.compile has compiled in this process so far (recompiles included)."""
    try:
        from torch._dynamo.utils import counters
    except ImportError:
        return 0
    return int(counters["stats"]["unique_graphs"])
