"""Loading checkpoints and builtins: round trips, dtypes, sharding, and errors a user can act on."""

import json
import time

import pytest
import torch
from safetensors.torch import load_file, save_file

from model_runtime import CheckpointError, load_model
from model_runtime.models.config import UnsupportedModelError
from model_runtime.models.loading import save_checkpoint

pytestmark = pytest.mark.runtime

BUILTINS = ["tiny-mixtral", "tiny-qwen3-moe", "tiny-deepseek-v3"]


def logits(model, seed=0, length=12):
    ids = torch.randint(0, 256, (1, length), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model(ids.to(model.device))[0]


@pytest.fixture(scope="module")
def deepseek():
    return load_model("builtin:tiny-deepseek-v3")


@pytest.fixture
def checkpoint(deepseek, tmp_path):
    return save_checkpoint(deepseek, tmp_path / "ckpt")


@pytest.mark.parametrize("name", BUILTINS)
def test_builtin_is_deterministic_fast_and_not_degenerate(name):
    model = load_model(f"builtin:{name}")
    start = time.monotonic()
    again = load_model(f"builtin:{name}")
    assert time.monotonic() - start < 3  # well under a second when the machine is not shared
    torch.testing.assert_close(logits(model), logits(again), atol=0, rtol=0)
    probs = logits(model, length=40).softmax(-1)  # [T, V]
    assert probs.max() < 0.99  # not one-hot
    assert len(set(probs.argmax(-1).tolist())) > 5  # next token depends on the context
    assert model.config.vocab_size >= 261 and model.config.eos_token_ids


def test_tiny_deepseek_v3_exercises_every_deepseek_part(deepseek):
    cfg = deepseek.config
    assert cfg.attention == "mla" and cfg.q_lora_rank and cfg.rope_scaling["rope_type"] == "yarn"
    assert cfg.scoring_func == "sigmoid" and cfg.n_group > 1 and cfg.topk_group < cfg.n_group
    assert cfg.shared_expert_intermediate_size and cfg.dense_layers == (0,)
    assert deepseek.layers[1].mlp.gate.e_score_correction_bias.abs().sum() > 0


@pytest.mark.parametrize("name", BUILTINS)
def test_checkpoint_round_trip(name, tmp_path):
    model = load_model(f"builtin:{name}")
    path = save_checkpoint(model, tmp_path / name)
    torch.testing.assert_close(logits(load_model(path)), logits(model), atol=0, rtol=0)
    torch.testing.assert_close(logits(load_model(f"hostpath://{path}")), logits(model), atol=0, rtol=0)


def test_sharded_checkpoint(deepseek, tmp_path):
    path = save_checkpoint(deepseek, tmp_path / "sharded", max_shard_bytes=200_000)
    assert len(list(path.glob("*.safetensors"))) > 2
    assert (path / "model.safetensors.index.json").is_file()
    torch.testing.assert_close(logits(load_model(path)), logits(deepseek), atol=0, rtol=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, "bfloat16"])
def test_half_precision(checkpoint, deepseek, dtype):
    model = load_model(checkpoint, dtype=dtype)
    expected = torch.bfloat16 if dtype == "bfloat16" else dtype
    assert {p.dtype for p in model.parameters()} == {expected}
    assert model.inv_freq.dtype == torch.float32 and model.inv_freq.device.type == "cpu"
    got, ref = logits(model, length=40), logits(deepseek, length=40)
    assert got.dtype == torch.float32
    # close on average; a token whose routing flips in half precision may differ more
    assert (got - ref).abs().mean() < 0.05 * ref.std()
    assert (got.argmax(-1) == ref.argmax(-1)).float().mean() > 0.9


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_loaded_weights_are_the_processs_own_memory_not_the_files_pages(checkpoint, dtype):
    """Every weight lives in memory of the process's own, none in the checkpoint file's mapping
    (safetensors hands those pages out where no cast is needed; the kernel may drop them under
    memory pressure and read them back from the volume at the next step), and the file can go
    once loaded."""
    model = load_model(checkpoint, dtype=dtype)
    mapped = []  # (start, end) of each mapping of a .safetensors file
    with open("/proc/self/maps") as f:
        for line in f:
            fields = line.split()
            if fields[-1].endswith(".safetensors"):
                start, end = (int(x, 16) for x in fields[0].split("-"))
                mapped.append((start, end))
    tensors = dict(model.named_parameters())
    in_file = [n for n, t in tensors.items() if any(a <= t.data_ptr() < b for a, b in mapped)]
    assert not in_file, f"weights still in the file's pages: {in_file[:5]}"
    before = logits(model)
    (checkpoint / "model.safetensors").unlink()
    torch.testing.assert_close(logits(model), before, atol=0, rtol=0)


def test_builtin_in_bfloat16():
    model = load_model("builtin:tiny-qwen3-moe", dtype="bfloat16")
    assert model.dtype == torch.bfloat16 and torch.isfinite(logits(model)).all()


def test_missing_tensor_names_the_key(checkpoint):
    file = checkpoint / "model.safetensors"
    tensors = load_file(file)
    del tensors["model.layers.2.self_attn.kv_b_proj.weight"]
    save_file(tensors, file)
    with pytest.raises(CheckpointError, match=r"model\.layers\.2\.self_attn\.kv_b_proj\.weight") as err:
        load_model(checkpoint)
    assert str(checkpoint) in str(err.value)


def test_missing_expert_names_the_key(checkpoint):
    file = checkpoint / "model.safetensors"
    tensors = load_file(file)
    del tensors["model.layers.1.mlp.experts.5.up_proj.weight"]
    save_file(tensors, file)
    with pytest.raises(CheckpointError, match=r"model\.layers\.1\.mlp\.experts\.5\.up_proj\.weight"):
        load_model(checkpoint)


def test_wrong_shape_names_file_and_key(checkpoint):
    file = checkpoint / "model.safetensors"
    tensors = load_file(file)
    tensors["model.layers.0.mlp.gate_proj.weight"] = torch.zeros(3, 3)
    tensors["model.layers.1.mlp.experts.2.down_proj.weight"] = torch.zeros(3, 3)
    save_file(tensors, file)
    with pytest.raises(CheckpointError, match=r"model\.safetensors.*(gate_proj|down_proj).*shape \[3, 3\]"):
        load_model(checkpoint)


def test_unsupported_architecture_is_named(checkpoint):
    config = json.loads((checkpoint / "config.json").read_text())
    config["architectures"] = ["LlamaForCausalLM"]
    (checkpoint / "config.json").write_text(json.dumps(config))
    with pytest.raises(UnsupportedModelError, match="LlamaForCausalLM.*not supported"):
        load_model(checkpoint)


@pytest.mark.parametrize(
    "quant, named",
    [({"quant_method": "fp8"}, "weight_block_size"), ({"quant_method": "awq", "bits": 4}, "'awq'")],
    ids=["fp8-per-tensor", "awq"],
)
def test_unsupported_prequantized_checkpoints_are_refused_naming_why(checkpoint, quant, named):
    """FP8 with block scales loads (tests/runtime/test_fp8.py); other formats are refused."""
    config = json.loads((checkpoint / "config.json").read_text())
    config["quantization_config"] = quant
    (checkpoint / "config.json").write_text(json.dumps(config))
    with pytest.raises(UnsupportedModelError, match=named):
        load_model(checkpoint)


def test_unknown_sources_are_refused(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_model(tmp_path)
    with pytest.raises(ValueError, match="builtin:tiny-mixtral"):
        load_model("builtin:nope")
    with pytest.raises(ValueError, match="hf://"):
        load_model("hf://org/model")
    with pytest.raises(ValueError, match="dtype"):
        load_model("builtin:tiny-mixtral", dtype="int4")


def test_ignores_extra_layers_and_ties_embeddings(deepseek, tmp_path):
    path = save_checkpoint(deepseek, tmp_path / "tied")
    tensors = load_file(path / "model.safetensors")
    tensors["model.layers.3.self_attn.kv_b_proj.weight"] = torch.zeros(2, 2)  # e.g. DeepSeek-V3's MTP layer
    tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"].clone()
    save_file(tensors, path / "model.safetensors")
    config = json.loads((path / "config.json").read_text())
    config["tie_word_embeddings"] = True
    (path / "config.json").write_text(json.dumps(config))
    model = load_model(path)
    assert model.lm_head.weight.data_ptr() == model.embed_tokens.weight.data_ptr()
