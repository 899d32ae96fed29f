"""`--model PATH`: HF folders (one file or sharded), their tokenizers, and everything that is refused."""

import json
import shutil

import pytest
import torch
from gguf import GGUFWriter
from safetensors.torch import load_file, save_file
from structlog.testing import capture_logs

from shared.engine.loader import load_model, load_model_config
from shared.engine.tokenizer import load_tokenizer
from tests.engine.hf_checkpoints import (
    CHAT_TEMPLATE,
    family_configs,
    hf_last_logits,
    our_last_logits,
    prompt_ids,
    write_checkpoint,
)

SUPPORTED = ("llama", "qwen3", "qwen3_moe")


@pytest.fixture(scope="module")
def moe_folders(tmp_path_factory):
    """The same random Qwen3-MoE saved whole and sharded (~5 KB shards, index file)."""
    root = tmp_path_factory.mktemp("hf")
    config = family_configs()["qwen3_moe"]
    hf = write_checkpoint(root / "whole", config, seed=0)
    write_checkpoint(root / "sharded", config, seed=0, max_shard_size="20KB")
    return root, hf


@pytest.fixture(scope="module")
def llama_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("hf") / "llama"
    write_checkpoint(folder, family_configs()["llama"])
    return folder


def copy_of(folder, tmp_path, name="copy"):
    target = tmp_path / name
    shutil.copytree(folder, target)
    return target


def edit_config(folder, **changes):
    path = folder / "config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


def test_sharded_index_loads_like_one_file(moe_folders):
    root, hf = moe_folders
    shards = sorted(p.name for p in (root / "sharded").glob("*.safetensors"))
    assert (root / "sharded" / "model.safetensors.index.json").is_file() and len(shards) > 2
    whole, sharded = load_model(root / "whole"), load_model(root / "sharded")
    ids = prompt_ids(37, seed=1)
    logits = our_last_logits(sharded, ids, 16)
    assert torch.equal(logits, our_last_logits(whole, ids, 16))
    assert (logits - hf_last_logits(hf, ids)).abs().max().item() <= 1e-4
    assert sharded.config == load_model_config(root / "sharded") == load_model_config(str(root / "sharded"))


def test_fused_expert_tensors_load_like_per_expert_ones(moe_folders, tmp_path):
    """transformers 5 keeps experts fused in memory ([E, 2I, H] gate_up); a checkpoint may store them so."""
    root, _ = moe_folders
    fused = copy_of(root / "whole", tmp_path)
    tensors = load_file(fused / "model.safetensors")
    for layer in (0, 2):  # the sparse layers
        prefix = f"model.layers.{layer}.mlp.experts"
        per_expert = {leaf: torch.stack([tensors.pop(f"{prefix}.{e}.{leaf}.weight") for e in range(6)])
                      for leaf in ("gate_proj", "up_proj", "down_proj")}
        tensors[f"{prefix}.gate_up_proj"] = torch.cat((per_expert["gate_proj"], per_expert["up_proj"]), dim=1)
        tensors[f"{prefix}.down_proj"] = per_expert["down_proj"]
    save_file(tensors, fused / "model.safetensors")
    ids = prompt_ids(23, seed=2)
    assert torch.equal(our_last_logits(load_model(fused), ids, 4), our_last_logits(load_model(root / "whole"), ids, 4))


def test_weights_id_names_content_not_path(moe_folders, tmp_path):
    root, _ = moe_folders
    whole = load_model_config(root / "whole")
    assert whole.fingerprint() == load_model_config(copy_of(root / "whole", tmp_path)).fingerprint()
    write_checkpoint(tmp_path / "other-seed", family_configs()["qwen3_moe"], seed=1, tokenizer=False)
    assert load_model_config(tmp_path / "other-seed").fingerprint() != whole.fingerprint()


# -- tokenizers --------------------------------------------------------------------------------


TEXTS = ["Hello world, this is a test.", "  spaces\n\n and héllo 日本語 🙂", "<|im_start|>user\nhi<|im_end|>\n", ""]


def test_folder_tokenizer_matches_transformers(llama_folder):
    from transformers import AutoTokenizer

    ours, theirs = load_tokenizer(llama_folder), AutoTokenizer.from_pretrained(llama_folder)
    for text in TEXTS:
        ids = ours.encode(text)
        assert ids == theirs.encode(text, add_special_tokens=False)
        assert ours.decode(ids, skip_special_tokens=False) == theirs.decode(ids)
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}]
    expected = theirs.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    assert ours.apply_chat_template(chat) == expected and expected.endswith("<|im_start|>assistant\n")
    assert ours.eos_token_ids == (2,) and ours.bos_token_id == 0


def test_chat_template_from_tokenizer_config(llama_folder, tmp_path):
    folder = copy_of(llama_folder, tmp_path)
    (folder / "chat_template.jinja").unlink()
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config["chat_template"] = [{"name": "tool_use", "template": "TOOLS"}, {"name": "default", "template": CHAT_TEMPLATE}]
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    assert load_tokenizer(folder).apply_chat_template([{"role": "user", "content": "x"}]) == (
        "<|im_start|>user\nx<|im_end|>\n<|im_start|>assistant\n"
    )


def test_folder_without_tokenizer_borrows_smollm2_only_when_vocab_matches(llama_folder, tmp_path):
    from transformers import LlamaConfig

    config = LlamaConfig(vocab_size=49152, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, bos_token_id=1, eos_token_id=2,
                         initializer_range=0.3, max_position_embeddings=128)
    write_checkpoint(tmp_path / "smol-vocab", config, tokenizer=False)
    with capture_logs() as logs:
        loaded = load_model(tmp_path / "smol-vocab")
    assert loaded.tokenizer.vocab_size == 49152 and loaded.tokenizer.encode("<|im_start|>") == [1]
    assert [e["event"] for e in logs if e["log_level"] == "warning"] == ["tokenizer_fallback"]

    no_tokenizer = copy_of(llama_folder, tmp_path, "no-tokenizer")
    (no_tokenizer / "tokenizer.json").unlink()
    for load in (load_model, load_tokenizer):
        with pytest.raises(ValueError) as info:
            load(no_tokenizer)
        assert "no tokenizer.json" in str(info.value) and "vocab_size 320" in str(info.value)


# -- refusals ----------------------------------------------------------------------------------


def refusal(load, target) -> str:
    with pytest.raises(ValueError) as info:
        load(target)
    return str(info.value)


@pytest.mark.parametrize("load", [load_model, load_model_config, load_tokenizer])
def test_unknown_architecture_is_refused_naming_the_supported(llama_folder, tmp_path, load):
    folder = copy_of(llama_folder, tmp_path)
    edit_config(folder, model_type="gpt2", architectures=["GPT2LMHeadModel"])
    message = refusal(load, folder)
    assert "'gpt2'" in message and all(family in message for family in SUPPORTED)


def test_unknown_names_and_paths_are_refused(tmp_path):
    message = refusal(load_model, "no-such-model")
    assert "unknown model 'no-such-model'" in message and "tiny-moe" in message and "config.json" in message
    (tmp_path / "empty").mkdir()
    assert "has no config.json" in refusal(load_model_config, tmp_path / "empty")
    (tmp_path / "weights.bin").write_bytes(b"\0" * 16)
    assert "is not a .gguf file" in refusal(load_model, tmp_path / "weights.bin")


def test_gguf_of_another_architecture_is_refused(tmp_path):
    path = tmp_path / "gpt2.gguf"
    writer = GGUFWriter(path, "gpt2")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    message = refusal(load_model_config, path)
    assert "GGUF architecture 'gpt2' is not supported" in message and "qwen3moe" in message


def test_missing_files_are_refused(llama_folder, moe_folders, tmp_path):
    weightless = tmp_path / "weightless"
    weightless.mkdir()
    shutil.copy(llama_folder / "config.json", weightless)
    assert "no *.safetensors weights" in refusal(load_model_config, weightless)
    (weightless / "pytorch_model.bin").write_bytes(b"")
    assert "found pytorch_model.bin: only safetensors are read" in refusal(load_model, weightless)

    sharded = copy_of(moe_folders[0] / "sharded", tmp_path, "sharded")
    shard = sorted(sharded.glob("model-*.safetensors"))[1]
    shard.unlink()
    assert f"names shards that are missing: {shard.name}" in refusal(load_model, sharded)


def test_unimplemented_features_are_refused(llama_folder, tmp_path):
    folder = copy_of(llama_folder, tmp_path)
    edit_config(folder, rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0})
    assert "rope type 'yarn'" in refusal(load_model_config, folder)
    edit_config(folder, rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, hidden_act="gelu")
    assert "hidden_act 'gelu'" in refusal(load_model, folder)


def test_tensor_mismatches_are_refused(llama_folder, tmp_path):
    folder = copy_of(llama_folder, tmp_path)
    tensors = load_file(llama_folder / "model.safetensors")
    missing = {k: v for k, v in tensors.items() if k != "model.layers.1.self_attn.k_proj.weight"}
    save_file(missing, folder / "model.safetensors")
    assert "no tensor 'model.layers.1.self_attn.k_proj.weight'" in refusal(load_model, folder)

    save_file({**tensors, "model.layers.0.mlp.shared_expert.weight": torch.zeros(2)}, folder / "model.safetensors")
    assert "have no place" in refusal(load_model, folder) and "shared_expert" in refusal(load_model, folder)

    edit_config(folder, intermediate_size=81)
    save_file(tensors, folder / "model.safetensors")
    assert "model.layers.0.mlp.gate_proj.weight" in refusal(load_model, folder) and "the config implies" in refusal(load_model, folder)
