"""Sampling a request leaves unset: the model's recommended settings, else the OpenAI defaults."""

import json

import pytest

from shared.engine.generation_defaults import (
    OPENAI_DEFAULTS,
    GenerationDefaults,
    choose_sampling,
    from_gguf_fields,
    from_hf_generation_config,
)
from shared.engine.loader import load_generation_defaults


def test_presets_state_theirs():
    smollm2 = load_generation_defaults("smollm2-135m")
    assert (smollm2.temperature, smollm2.top_p, smollm2.top_k) == (0.0, None, None)  # greedy, as HF's generate()
    assert "generation_config.json" in smollm2.source
    assert load_generation_defaults("tiny-llama") == GenerationDefaults()  # random weights recommend nothing


def test_hf_folder_generation_config_is_read(tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "llama"}))
    assert load_generation_defaults(str(folder)) == GenerationDefaults()  # no generation_config.json
    (folder / "generation_config.json").write_text(json.dumps({"do_sample": True, "temperature": 0.6, "top_p": 0.95, "top_k": 20}))
    defaults = load_generation_defaults(str(folder))
    assert (defaults.temperature, defaults.top_p, defaults.top_k) == (0.6, 0.95, 20)


def test_without_do_sample_it_is_greedy_and_odd_values_are_ignored():
    assert from_hf_generation_config({"do_sample": False, "temperature": 0.7}, "x").temperature == 0.0
    assert from_hf_generation_config({"bos_token_id": 1, "eos_token_id": 2}, "x").temperature == 0.0
    odd = from_hf_generation_config({"do_sample": True, "temperature": "hot", "top_k": True, "top_p": 0.8}, "x")
    assert (odd.temperature, odd.top_k, odd.top_p) == (None, None, 0.8)


def test_gguf_sampling_keys():
    assert from_gguf_fields({}, "f.gguf") == GenerationDefaults()
    found = from_gguf_fields({"general.sampling.temp": 0.3, "general.sampling.top_k": 40}, "f.gguf")
    assert (found.temperature, found.top_p, found.top_k, found.source) == (0.3, None, 40, "f.gguf")


@pytest.mark.parametrize(
    "requested, model, expected",
    [
        ((None, None, None), GenerationDefaults(0.2, 0.9, None), (0.2, 0.9, 0)),
        ((0.0, None, None), GenerationDefaults(0.2, 0.9, None), (0.0, 0.9, 0)),  # an explicit 0 is kept
        ((1.3, 0.5, 7), GenerationDefaults(0.2, 0.9, 50), (1.3, 0.5, 7)),
        ((None, None, None), GenerationDefaults(), (OPENAI_DEFAULTS.temperature, OPENAI_DEFAULTS.top_p, OPENAI_DEFAULTS.top_k)),
    ],
)
def test_request_then_model_then_openai(requested, model, expected):
    chosen = choose_sampling(*requested, model)
    assert (chosen.temperature, chosen.top_p, chosen.top_k) == expected
