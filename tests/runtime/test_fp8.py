"""FP8 block-quantized checkpoints in DeepSeek-V3's published format.

The test writes a tiny DeepSeek-V3 checkpoint as DeepSeek did theirs: every linear weight of the
decoder layers as float8_e4m3fn with a float32 `weight_scale_inv` per 128 x 128 block
(`quantization_config`: fp8, e4m3, dynamic, [128, 128]); embedding, norms, routers and lm_head
stay float. Some dimensions are multiples of 128 and some are not (q_lora_rank 192, the kv latent
80 + 128). The reference is a float model built from the dequantized weights: the FP8 model gives
its logits and greedy tokens, alone and over 2 ranks, while holding the weights as FP8.
"""

from __future__ import annotations

import json

import pytest
import torch
from parallel_ranks import greedy_paged, launch, mixed_contexts, mixed_steps
from safetensors.torch import load_file, save_file

from model_runtime.kernels.fp8 import FP8, dequantize, quantize
from model_runtime.models.architectures import UnsupportedModelError
from model_runtime.models.builtin import random_model
from model_runtime.models.config import ModelConfig
from model_runtime.models.loading import CheckpointError, load_model, save_checkpoint

pytestmark = pytest.mark.runtime

BLOCK = (128, 128)
HF_CONFIG = {
    "architectures": ["DeepseekV3ForCausalLM"],
    "model_type": "deepseek_v3",
    "vocab_size": 300,  # a byte-level tokenizer serves it
    "hidden_size": 256,
    "intermediate_size": 512,  # the dense layer: 256 rows per rank at 2 ranks
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "num_key_value_heads": 2,
    "q_lora_rank": 192,  # not a multiple of 128
    "kv_lora_rank": 80,  # kv_a_proj_with_mqa: 80 + 128 rows, not a multiple
    "qk_nope_head_dim": 128,
    "qk_rope_head_dim": 128,
    "v_head_dim": 128,
    "n_routed_experts": 5,
    "num_experts_per_tok": 2,
    "moe_intermediate_size": 128,
    "n_shared_experts": 2,
    "first_k_dense_replace": 1,
    "n_group": 1,
    "topk_group": 1,
    "routed_scaling_factor": 2.5,
    "norm_topk_prob": True,
    "max_position_embeddings": 128,
    "rms_norm_eps": 1e-6,
    "rope_theta": 10000.0,
    "tie_word_embeddings": False,
}
FP8_CONFIG = {
    "quant_method": "fp8",
    "fmt": "e4m3",
    "activation_scheme": "dynamic",
    "weight_block_size": list(BLOCK),
}


def is_quantized(key: str) -> bool:
    """The tensors DeepSeek-V3's checkpoint stores as FP8: the decoder layers' linear weights."""
    return (
        key.startswith("model.layers.")
        and key.endswith(".weight")
        and "layernorm" not in key
        and not key.endswith("mlp.gate.weight")  # the router stays float
    )


def write(path, tensors, config):
    path.mkdir()
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    (path / "config.json").write_text(json.dumps(config))
    return path


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """(fp8 checkpoint, float32 checkpoint of its dequantized weights)."""
    root = tmp_path_factory.mktemp("fp8")
    model = random_model(ModelConfig.from_hf(HF_CONFIG), seed=11)
    src = save_checkpoint(model, root / "source")
    fp8, dequantized = {}, {}
    for key, tensor in load_file(str(src / "model.safetensors")).items():
        if is_quantized(key):
            q, scale_inv = quantize(tensor, BLOCK)
            fp8[key], fp8[f"{key}_scale_inv"] = q, scale_inv
            dequantized[key] = dequantize(q, scale_inv, BLOCK, torch.float32)
        else:
            fp8[key] = dequantized[key] = tensor.to(torch.bfloat16 if "e_score" not in key else torch.float32)
    config = json.loads((src / "config.json").read_text())
    assert any(k.endswith("weight_scale_inv") and v.shape[0] * 128 > 192 for k, v in fp8.items())
    return (
        write(root / "fp8", fp8, {**config, "quantization_config": FP8_CONFIG}),
        write(root / "dequantized", dequantized, config),
    )


PROMPTS = {"A": list(range(3, 32)), "B": [5, 9, 2, 7, 1, 4, 8, 6, 3, 11], "C": [1, 2, 3], "D": [42]}
DECODED = {"C": 17, "D": 23}
GREEDY_PROMPT = [4, 8, 15, 16, 23, 42]


def test_fp8_weights_stay_fp8_in_memory(checkpoints):
    fp8, dequantized = checkpoints
    model, ref = load_model(fp8), load_model(dequantized)
    experts = model.layers[1].mlp.experts
    assert experts.gate_up_proj.dtype == FP8 and experts.down_proj.dtype == FP8
    assert model.layers[0].self_attn.q_b_proj.weight.dtype == FP8
    assert model.layers[1].mlp.gate.weight.dtype == torch.float32  # the router is not quantized
    # FP8 weights are a quarter of float32 ones (plus one float32 scale per 128 x 128 block)
    assert model.weight_bytes() < 0.5 * ref.weight_bytes()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fp8_logits_and_greedy_tokens_equal_the_dequantized_model(checkpoints, dtype):
    fp8, dequantized = checkpoints
    model, ref = load_model(fp8, dtype=dtype), load_model(dequantized, dtype=dtype)
    ids = torch.randint(0, 300, (2, 13), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(model(ids), ref(ids), atol=1e-5, rtol=1e-5)
    assert greedy_paged(model, GREEDY_PROMPT, 24) == greedy_paged(ref, GREEDY_PROMPT, 24)


def test_fp8_over_two_ranks_equals_the_dequantized_model(checkpoints):
    fp8, dequantized = checkpoints
    ref = load_model(dequantized)
    job = {"prompts": PROMPTS, "decoded": DECODED, "greedy_prompt": GREEDY_PROMPT, "greedy_steps": 24}
    ranks = launch(fp8, 2, True, job)
    want = [torch.from_numpy(t.numpy()) for t in mixed_steps(ref, PROMPTS, DECODED)]
    assert len(mixed_contexts(PROMPTS, DECODED)) == len(want)
    for result in ranks:
        for got, expected in zip(result["logits"], want, strict=True):
            torch.testing.assert_close(torch.from_numpy(got), expected, atol=1e-4, rtol=1e-4)
        assert result["greedy"] == greedy_paged(ref, GREEDY_PROMPT, 24)
    # each rank read only its own experts' FP8 weights and scales
    for result in ranks:
        other = set(range(5)) - set(range(result["experts"][0][0], sum(result["experts"][0])))
        assert not [k for k in result["reads"] if any(f".experts.{e}." in k for e in other)]
        assert any(k.endswith("weight_scale_inv") for k in result["reads"])


def test_a_shard_edge_inside_a_scale_block_is_refused_naming_the_tensor(checkpoints):
    fp8, _ = checkpoints  # without expert parallelism each expert's 128 rows split 64 / 64
    job = {"prompts": PROMPTS, "decoded": DECODED, "greedy_prompt": GREEDY_PROMPT, "greedy_steps": 1}
    with pytest.raises(
        RuntimeError, match=r"experts\.\d+\.(gate|up|down)_proj\.weight_scale_inv.*FP8 scale blocks"
    ):
        launch(fp8, 2, False, job)


def test_unsupported_quantization_is_refused_naming_it(tmp_path):
    for quant, named in [
        ({"quant_method": "gptq", "bits": 4}, "'gptq'"),
        ({"quant_method": "fp8", "activation_scheme": "dynamic"}, "weight_block_size"),
        ({**FP8_CONFIG, "activation_scheme": "static"}, "'static'"),
        ({**FP8_CONFIG, "ignored_layers": ["x"]}, "ignored_layers"),
    ]:
        with pytest.raises(UnsupportedModelError, match=named):
            ModelConfig.from_hf({**HF_CONFIG, "quantization_config": quant})


def test_stray_and_mistyped_tensors_are_refused_naming_them(checkpoints, tmp_path):
    fp8, _ = checkpoints
    tensors = load_file(str(fp8 / "model.safetensors"))
    config = json.loads((fp8 / "config.json").read_text())
    cases = {
        "qweight": (
            {**tensors, "model.layers.0.self_attn.o_proj.qweight": torch.zeros(4, dtype=torch.int32)},
            config,
        ),
        "no-scale": (
            {k: v for k, v in tensors.items() if k != "model.layers.0.self_attn.o_proj.weight_scale_inv"},
            config,
        ),
        "int-weight": (
            {**tensors, "model.layers.0.mlp.up_proj.weight": torch.zeros(512, 256, dtype=torch.int8)},
            config,
        ),
        "fp8-without-config": (tensors, {k: v for k, v in config.items() if k != "quantization_config"}),
    }
    expected = {
        "qweight": "model.layers.0.self_attn.o_proj.qweight",
        "no-scale": "model.layers.0.self_attn.o_proj.weight",
        "int-weight": "model.layers.0.mlp.up_proj.weight",
        "fp8-without-config": "weight_scale_inv",
    }
    for name, (state, cfg) in cases.items():
        path = write(tmp_path / name, state, cfg)
        with pytest.raises(CheckpointError) as error:
            load_model(path)
        assert expected[name] in str(error.value), (name, str(error.value))


def test_an_fp8_checkpoint_serves_what_its_dequantized_model_does(checkpoints, server_process):
    import httpx

    texts, weight_bytes = [], []
    for path in checkpoints:
        server = server_process("--dtype", "bfloat16", "--device", "cpu", model=str(path))
        try:
            reply = httpx.post(
                f"{server.base_url}/v1/completions",
                json={"model": path.name, "prompt": "The experts", "max_tokens": 12, "temperature": 0},
                timeout=60,
            )
            assert reply.status_code == 200, reply.text
            texts.append(reply.json()["choices"][0]["text"])
            metrics = httpx.get(f"{server.base_url}/metrics").text
            line = next(x for x in metrics.splitlines() if x.startswith("moe_weight_bytes{"))
            weight_bytes.append(float(line.split()[-1]))
        finally:
            assert server.stop() == 0, server.logs()
    assert texts[0] == texts[1] and len(texts[0]) > 0
    assert weight_bytes[0] < 0.7 * weight_bytes[1]  # FP8 in memory, not bf16


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_c_dequantization_gives_torchs_bits(dtype, monkeypatch):
    """kernels/csrc/cpu_decode.c's moe_fp8_dequant against torch's own float8 conversion, for every
    FP8 value and for blocks cut at the edges."""
    from model_runtime.kernels import fp8

    if fp8.cpu_kernels() is None:
        pytest.skip("no C kernels on this machine")
    gen = torch.Generator().manual_seed(3)
    w = (torch.randn(300, 200, generator=gen) * 40).to(FP8)
    w.view(torch.uint8)[0, :256 - 56] = torch.arange(200, dtype=torch.uint8)  # every byte value shows up
    w.view(torch.uint8)[1, :56] = torch.arange(200, 256, dtype=torch.uint8)
    scale = torch.rand(3, 2, generator=gen) + 0.01
    with_c = fp8.dequantize(w, scale, BLOCK, dtype)
    monkeypatch.setattr(fp8, "cpu_kernels", lambda: None)
    with_torch = fp8.dequantize(w, scale, BLOCK, dtype)
    assert torch.equal(with_c.nan_to_num(7.0), with_torch.nan_to_num(7.0))
    assert with_c.isnan().sum() == with_torch.isnan().sum() > 0
