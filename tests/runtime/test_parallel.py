"""A tensor / expert parallel replica computes what one process and transformers compute.

For each architecture, transformers writes a tiny random checkpoint with odd sizes: expert counts
that no rank count divides (5, 7, 9, 15), intermediate sizes that split unevenly, and for Mixtral
fewer key/value heads (2) than ranks (4), so they are replicated. Each (architecture, ranks, expert
parallel) combination is one launch of rank processes over gloo on 127.0.0.1 (parallel_ranks.py)
that does everything for it; the references (one process, transformers) run here:

    logits      a mixed paged step (a whole prompt, a second prefill chunk over cached tokens, two
                decodes) after a prefill step: float32 logits within 1e-4 of one process's and of
                transformers' for the same positions
    greedy      32 greedy tokens through paged decoding: those of one process and of `generate`
    reads       with expert parallelism a rank reads no tensor of another rank's experts and every
                one of its own; each tensor it reads, it reads once
    bytes       each rank holds the replicated tensors plus its slice (computed here from the
                checkpoint's shapes), and the ranks together hold the model once plus the
                replicated tensors on every rank but one

Refusals (one process): an unknown tensor (a quantization scale) and an integer tensor are refused
with a CheckpointError naming the tensor.
"""

from __future__ import annotations

import json
import math
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from parallel_ranks import greedy_paged, launch, mixed_contexts, mixed_steps
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from test_equivalence import MLA, YARN, randomise

from model_runtime import load_model
from model_runtime.distributed import split_range
from model_runtime.models.loading import CheckpointError

pytestmark = pytest.mark.runtime
transformers = pytest.importorskip("transformers")

VOCAB = 101
COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    intermediate_size=50,  # dense layers: 25/25 or 13/13/12/12 rows per rank
    num_hidden_layers=3,
    max_position_embeddings=256,
    bos_token_id=0,
    eos_token_id=None,
    # transformers' default grouped_mm needs 16-byte strides, which odd expert sizes do not have
    experts_implementation="eager",
)
GREEDY_STEPS = 32


def hf_models():
    """(model class, config, heads H, key/value heads K, routed experts E) per architecture."""
    t = transformers
    return {
        "mixtral": (
            t.MixtralForCausalLM,
            t.MixtralConfig(
                **{**COMMON, "intermediate_size": 42},  # Mixtral's experts: 21 or 11/11/10/10 rows
                num_attention_heads=8,
                num_key_value_heads=2,  # fewer than 4 ranks: each kv head on two ranks
                head_dim=8,
                num_local_experts=7,
                num_experts_per_tok=2,
            ),
        ),
        "qwen2-moe": (
            t.Qwen2MoeForCausalLM,
            t.Qwen2MoeConfig(
                **COMMON,
                num_attention_heads=4,
                num_key_value_heads=4,
                num_experts=5,
                num_experts_per_tok=3,
                moe_intermediate_size=18,
                shared_expert_intermediate_size=22,
                mlp_only_layers=[1],
                norm_topk_prob=False,
            ),
        ),
        "qwen3-moe": (
            t.Qwen3MoeForCausalLM,
            t.Qwen3MoeConfig(
                **COMMON,
                num_attention_heads=8,
                num_key_value_heads=4,
                head_dim=12,
                num_experts=9,
                num_experts_per_tok=2,
                moe_intermediate_size=18,
                norm_topk_prob=True,
                decoder_sparse_step=2,
            ),
        ),
        "deepseek-v2": (
            t.DeepseekV2ForCausalLM,
            t.DeepseekV2Config(
                **COMMON,
                **MLA,
                num_attention_heads=4,
                q_lora_rank=None,
                n_routed_experts=9,
                num_experts_per_tok=2,
                moe_intermediate_size=18,
                n_shared_experts=2,
                topk_method="group_limited_greedy",
                n_group=3,
                topk_group=2,
                routed_scaling_factor=1.5,
                first_k_dense_replace=1,
            ),
        ),
        "deepseek-v3": (
            t.DeepseekV3ForCausalLM,
            t.DeepseekV3Config(
                **COMMON,
                **{**MLA, "num_key_value_heads": 8},
                num_attention_heads=8,
                q_lora_rank=24,
                n_routed_experts=15,
                num_experts_per_tok=4,
                moe_intermediate_size=18,
                n_shared_experts=1,
                n_group=5,
                topk_group=2,
                routed_scaling_factor=2.5,
                norm_topk_prob=True,
                first_k_dense_replace=1,
                rope_parameters=YARN,
            ),
        ),
    }


ARCHS = list(hf_models())
# (architecture, ranks, expert parallel): each one launch of its ranks
COMBOS = [(a, world, ep) for world in (2, 4) for a in ARCHS for ep in (False, True)]

_gen = torch.Generator().manual_seed(11)
PROMPTS = {  # A is longer than MLA's expand_above (26): the mixed step expands MLA's latents
    name: torch.randint(1, VOCAB, (n,), generator=_gen).tolist()
    for name, n in (("A", 29), ("B", 11), ("C", 7), ("D", 4))
}
DECODED = {"C": 17, "D": 42}  # the tokens C and D decode in the mixed step
GREEDY_PROMPT = torch.randint(1, VOCAB, (9,), generator=_gen).tolist()
JOB = dict(prompts=PROMPTS, decoded=DECODED, greedy_prompt=GREEDY_PROMPT, greedy_steps=GREEDY_STEPS)


@dataclass
class Reference:
    """One architecture's checkpoint and what one process and transformers compute from it."""

    path: Path
    heads: int
    kv_heads: int
    experts: int
    shapes: dict[str, tuple[int, ...]]  # every checkpoint tensor's shape
    weight_bytes: int  # one process's model
    logits: list[torch.Tensor]  # one process: mixed_steps
    hf_logits: list[torch.Tensor]  # transformers, at the same positions
    greedy: list[int]
    hf_greedy: list[int]


@pytest.fixture(scope="module")
def references(tmp_path_factory):
    built: dict[str, Reference] = {}

    def get(arch: str) -> Reference:
        if arch not in built:
            built[arch] = build_reference(arch, tmp_path_factory.mktemp(arch))
        return built[arch]

    return get


def build_reference(arch: str, path: Path) -> Reference:
    cls, cfg = hf_models()[arch]
    torch.manual_seed(0)
    hf = cls(cfg).eval()
    randomise(hf, seed=len(arch))
    # DeepSeek-V3 is written as several files with an index
    hf.save_pretrained(path, max_shard_size="40KB" if arch == "deepseek-v3" else "1GB")
    shapes = {}
    for file in path.glob("*.safetensors"):
        with safe_open(str(file), framework="pt") as f:
            shapes.update({key: tuple(f.get_slice(key).get_shape()) for key in f.keys()})
    ours = load_model(path)
    with torch.no_grad():
        hf_logits = [
            torch.stack([hf(torch.tensor([ctx])).logits[0, -1] for ctx in step])
            for step in mixed_contexts(PROMPTS, DECODED)
        ]
        generated = hf.generate(
            torch.tensor([GREEDY_PROMPT]),
            do_sample=False,
            max_new_tokens=GREEDY_STEPS,
            eos_token_id=None,
            pad_token_id=0,
        )
    text = json.loads((path / "config.json").read_text())
    return Reference(
        path=path,
        heads=text["num_attention_heads"],
        kv_heads=text.get("num_key_value_heads") or text["num_attention_heads"],
        experts=ours.config.num_experts,
        shapes=shapes,
        weight_bytes=ours.weight_bytes(),
        logits=mixed_steps(ours, PROMPTS, DECODED),
        hf_logits=hf_logits,
        greedy=greedy_paged(ours, GREEDY_PROMPT, GREEDY_STEPS),
        hf_greedy=generated[0, len(GREEDY_PROMPT) :].tolist(),
    )


@pytest.fixture(scope="module", params=COMBOS, ids=lambda c: f"{c[0]}-tp{c[1]}{'-ep' if c[2] else ''}")
def replica(request, references):
    """(reference, world, ep, each rank's results) of one launch."""
    arch, world, ep = request.param
    ref = references(arch)
    return ref, world, ep, launch(ref.path, world, ep, JOB)


# ---- one process: the references agree with transformers -------------------------------------


@pytest.mark.parametrize("arch", ARCHS)
def test_one_process_matches_transformers(arch, references):
    ref = references(arch)
    for got, expected in zip(ref.logits, ref.hf_logits, strict=True):
        torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    assert len(ref.hf_greedy) == GREEDY_STEPS
    assert ref.greedy == ref.hf_greedy


# ---- the replica's ranks -------------------------------------------------------------------------


def test_logits_match_one_process_and_transformers(replica):
    ref, world, _, ranks = replica
    for out in ranks:
        for step, (got, single, hf) in enumerate(zip(out["logits"], ref.logits, ref.hf_logits, strict=True)):
            got = torch.from_numpy(got)
            where = f"rank {out['rank']} of {world}, step {step}"
            torch.testing.assert_close(got, single, atol=1e-4, rtol=1e-4, msg=lambda m, w=where: f"{w}: {m}")
            torch.testing.assert_close(got, hf, atol=1e-4, rtol=1e-4, msg=lambda m, w=where: f"{w}: {m}")


def test_greedy_tokens_match_one_process_and_generate(replica):
    ref, _, _, ranks = replica
    for out in ranks:
        assert out["greedy"] == ref.greedy == ref.hf_greedy, f"rank {out['rank']}"


EXPERT_KEY = re.compile(r"\.experts\.(\d+)\.(\w+)\.weight$")
ROW_SPLIT_BIAS = re.compile(r"\.(o_proj|down_proj)\.bias$")  # rank 0's only


def test_each_rank_reads_its_experts_and_no_others(replica):
    ref, world, ep, ranks = replica
    for out in ranks:
        rank, reads = out["rank"], out["reads"]
        e0, e1 = split_range(ref.experts, world, rank) if ep else (0, ref.experts)
        assert out["experts"] == [(e0, e1 - e0)]
        assert len(reads) == len(set(reads)), f"rank {rank} read a tensor twice"
        expert_reads = {int(EXPERT_KEY.search(k)[1]) for k in reads if EXPERT_KEY.search(k)}
        foreign = sorted(e for e in expert_reads if not e0 <= e < e1)
        assert not foreign, f"rank {rank} of {world} (experts {e0}..{e1 - 1}) read experts {foreign}"
        expected = {k for k in ref.shapes if not (ROW_SPLIT_BIAS.search(k) and rank != 0)}
        expected -= {k for k in ref.shapes if (m := EXPERT_KEY.search(k)) and not e0 <= int(m[1]) < e1}
        assert set(reads) == expected, (
            f"rank {rank}: not read {sorted(expected - set(reads))[:5]}, unexpected {sorted(set(reads) - expected)[:5]}"
        )


ATTN = re.compile(r"\.self_attn\.(\w+)\.(weight|bias)$")
MLP = re.compile(
    r"\.(?:mlp|block_sparse_moe)\.(?:shared_experts?\.)?(gate_proj|up_proj|down_proj)\.(weight|bias)$"
)
DOWN = ("w2", "down_proj")  # an expert's down projection: its columns are split


def held(
    key: str, shape: tuple[int, ...], ref: Reference, world: int, rank: int, ep: bool
) -> tuple[int, bool]:
    """(elements of checkpoint tensor `key` that `rank` holds, whether every rank holds all of it),
    from the layout: heads split evenly (kv heads replicated when fewer than ranks), intermediate
    rows in split_range parts, routed experts whole in split_range parts with expert parallelism."""
    n = math.prod(shape)

    def rows(dim: int) -> int:
        start, stop = split_range(shape[dim], world, rank)
        return n // shape[dim] * (stop - start)

    if m := EXPERT_KEY.search(key):
        expert, leaf = int(m[1]), m[2]
        if ep:
            start, stop = split_range(ref.experts, world, rank)
            return (n if start <= expert < stop else 0), False
        return rows(1 if leaf in DOWN else 0), False
    if m := ATTN.search(key):
        leaf, kind = m.groups()
        if leaf in ("q_proj", "q_b_proj", "kv_b_proj") or (leaf == "o_proj" and kind == "weight"):
            assert ref.heads % world == 0
            return n // world, False  # H / world heads of H
        if leaf in ("k_proj", "v_proj"):
            return n // ref.kv_heads * max(ref.kv_heads // world, 1), False
        if leaf == "o_proj":
            return (n if rank == 0 else 0), False
        return n, True  # q_a_proj, kv_a_proj_with_mqa, the norms
    if m := MLP.search(key):
        leaf, kind = m.groups()
        if leaf == "down_proj":
            return (rows(1) if kind == "weight" else n if rank == 0 else 0), False
        return rows(0), False
    return n, True  # embedding, norms, routers, lm_head, the shared expert gate


def test_each_rank_holds_its_share_of_the_weights(replica):
    ref, world, ep, ranks = replica
    itemsize = 4  # float32
    replicated = sum(
        held(k, s, ref, world, 0, ep)[0] for k, s in ref.shapes.items() if held(k, s, ref, world, 0, ep)[1]
    )
    replicated *= itemsize
    for out in ranks:
        share = sum(held(k, s, ref, world, out["rank"], ep)[0] for k, s in ref.shapes.items()) * itemsize
        assert out["weight_bytes"] == share, f"rank {out['rank']} of {world}"
        assert share < ref.weight_bytes
    total = sum(out["weight_bytes"] for out in ranks)
    # fewer key/value heads than ranks: each is on world / K ranks, so world / K - 1 extra copies
    extra_kv_copies = max(world // ref.kv_heads - 1, 0) * sum(
        math.prod(s) for k, s in ref.shapes.items() if re.search(r"\.self_attn\.[kv]_proj\.", k)
    )
    assert total - (world - 1) * replicated - extra_kv_copies * itemsize == ref.weight_bytes


# ---- refusals ------------------------------------------------------------------------------------


def rewrite(src: Path, dst: Path, change) -> Path:
    """A copy of checkpoint `src` whose single safetensors file `change(tensors)` edited."""
    shutil.copytree(src, dst)
    file = dst / "model.safetensors"
    tensors = load_file(file)
    change(tensors)
    save_file(tensors, file, metadata={"format": "pt"})
    return dst


def test_an_unknown_tensor_is_refused_by_name(references, tmp_path):
    key = "model.layers.0.self_attn.q_proj.weight_scale_inv"

    def add_scale(tensors):
        tensors[key] = torch.ones(2, 2)

    path = rewrite(references("mixtral").path, tmp_path / "ckpt", add_scale)
    with pytest.raises(CheckpointError, match=re.escape(repr(key))):
        load_model(path)


@pytest.mark.parametrize("dtype", [torch.int8, torch.int64])
def test_an_integer_tensor_is_refused_by_name(references, tmp_path, dtype):
    key = "model.layers.1.self_attn.k_proj.weight"

    def make_integer(tensors):
        tensors[key] = tensors[key].round().to(dtype)

    path = rewrite(references("mixtral").path, tmp_path / "ckpt", make_integer)
    with pytest.raises(CheckpointError, match=re.escape(repr(key))) as error:
        load_model(path)
    assert "I8" in str(error.value) or "I64" in str(error.value)
