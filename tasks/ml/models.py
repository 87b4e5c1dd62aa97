"""The chat model in its three forms: base (tokenizer + weights from model.base_model), with a LoRA adapter for
training, and merged for inference. torch, transformers and peft are imported inside the functions."""

from __future__ import annotations

import tempfile

from tasks.errors import StepError
from tasks.io import s3


def load_base(cfg, device: str, dtype):
    """Tokenizer + base model from model.base_model (HF id, local folder or s3:// prefix)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tasks.ml.model_source import check_chat_template, resolve_base_model

    path = resolve_base_model(cfg.model)
    tokenizer = AutoTokenizer.from_pretrained(path)
    check_chat_template(tokenizer, cfg.model.base_model)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.unk_token or tokenizer.eos_token
    kwargs = {"dtype": dtype, "attn_implementation": cfg.model.attn_implementation}
    if cfg.lora.quantization == "nf4":
        if device != "cuda":
            raise StepError("lora.quantization=nf4 (QLoRA) needs a CUDA GPU and bitsandbytes; this machine has none. "
                            "Set lora.quantization=none to train LoRA on CPU.")
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16,
            bnb_4bit_use_double_quant=True)
        kwargs["device_map"] = {"": 0}
    model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    if cfg.lora.quantization != "nf4":
        model.to(device)
    model.config.use_cache = False
    return tokenizer, model


def add_lora(model, cfg, seed: int):
    """LoRA on ``cfg.lora.target_modules`` of a frozen base (4-bit or not), with gradient checkpointing when
    configured. A 4-bit base keeps its other weights (embeddings, norms, output head) in the compute dtype: peft's
    ``prepare_model_for_kbit_training`` would upcast them to fp32, which doubles their memory and makes the residual
    stream and every saved activation fp32 -- most of what QLoRA saves over LoRA."""
    import torch
    from peft import LoraConfig, get_peft_model

    for param in model.parameters():  # the base is frozen; only the adapter trains
        param.requires_grad_(False)
    if cfg.training.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    torch.manual_seed(seed)  # LoRA A init is random: same seed, same starting adapter
    lora = LoraConfig(r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
                      target_modules=list(cfg.lora.target_modules), task_type="CAUSAL_LM")
    return get_peft_model(model, lora)


def load_local(cfg, adapter_dir: str | None = None):
    """(tokenizer, model) on the best device; with an adapter folder, merged into the base for fast decoding."""
    from tasks.ml import generation
    from tasks.ml.training import device_and_dtype

    device, dtype = device_and_dtype(cfg.training)
    tokenizer, model = load_base(cfg, device, dtype)
    if adapter_dir:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter_dir)
    model.config.use_cache = True
    return tokenizer, generation.merge_for_inference(model)


def load_for_inference(cfg, adapter_uri: str | None = None):
    if not adapter_uri:
        return load_local(cfg)
    with tempfile.TemporaryDirectory() as tmp:
        s3.download_prefix(adapter_uri, tmp)
        return load_local(cfg, tmp)


def peak_memory_mb(device: str) -> float:
    import resource

    import torch

    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
