"""HF transformers as the correctness oracle: it loads the same SmolLM2 GGUF with its own code.

Test-only (shared/ never imports transformers). The model and tokenizer are loaded once
per process and shared by every test that asks (engine tests and end-to-end tests).
HF needs `accelerate` installed to load a GGUF model.
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch

from shared.engine.presets import smollm2_gguf_path


def gguf_path() -> Path:
    return smollm2_gguf_path()


@functools.cache
def hf_model():
    from transformers import AutoModelForCausalLM

    path = gguf_path()
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    return model.eval()


@functools.cache
def hf_tokenizer():
    from transformers import AutoTokenizer

    path = gguf_path()
    return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


@torch.inference_mode()
def hf_last_logits(prompt_ids: list[int]) -> torch.Tensor:
    """float32 logits `[vocab]` after the last prompt token."""
    return hf_model()(torch.tensor([prompt_ids])).logits[0, -1].float()


@torch.inference_mode()
def hf_greedy_tokens(prompt_ids: list[int], max_new_tokens: int) -> list[int]:
    """Greedy continuation; stops after EOS (included) like the engine does."""
    model = hf_model()
    eos = model.generation_config.eos_token_id
    output = model.generate(
        torch.tensor([prompt_ids]),
        attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.int64),
        max_new_tokens=max_new_tokens,
        do_sample=False,
        pad_token_id=eos,
    )
    return output[0, len(prompt_ids):].tolist()
