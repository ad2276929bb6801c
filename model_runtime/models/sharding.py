"""Which slice of each of the whole model's tensors one rank holds (model_runtime.distributed.Shard
decides the heads, rows and experts; this maps them onto parameter names).

The loader reads exactly these slices from the safetensors files (`get_slice`), so a rank never
reads another rank's rows or experts; `shard_state` cuts a whole model's state the same way (the
builtin models, built whole from a seed).

    attention   q_proj, q_b_proj, kv_b_proj     rows of this rank's heads          (column-split)
                k_proj, v_proj                  rows of this rank's key/value heads
                o_proj                          columns of this rank's heads       (row-split)
    MLP, shared experts   gate_proj, up_proj    this rank's intermediate rows
                          down_proj             the same columns
    routed experts        expert parallel: this rank's experts whole; else every expert's
                          intermediate rows (gate, up) and columns (down)
    everything else (embedding, norms, routers, kv_a_proj, lm_head) is replicated.

Row-split projections keep their bias on rank 0 only (Shard.holds_bias_of_reduced_output).
"""

from __future__ import annotations

import re

import torch

from model_runtime.distributed.shard import Shard
from model_runtime.models.config import ModelConfig

Cut = tuple[int, int, int]  # (dim, start, stop) of the whole tensor

_ATTN = re.compile(r"\.self_attn\.(\w+)\.(weight|bias)$")
_MLP = re.compile(r"\.mlp\.(?:shared_experts\.)?(gate_proj|up_proj|down_proj)\.(weight|bias)$")
_STACKED = re.compile(r"\.mlp\.experts\.(gate_up_proj|down_proj)$")
_HEAD_COLUMNS = ("q_proj", "q_b_proj", "kv_b_proj")


def cut(name: str, shape: tuple[int, ...], cfg: ModelConfig, shard: Shard) -> Cut | None:
    """This rank's slice of parameter `name` (whole shape `shape`), None for all of it. Not for
    the stacked routed experts (see `expert_cut`)."""
    if not shard.sharded:
        return None
    if m := _ATTN.search(name):
        leaf, kind = m.groups()
        H = cfg.num_attention_heads
        if leaf in _HEAD_COLUMNS:
            h0, h1 = shard.heads(H)
            per = shape[0] // H
            return 0, h0 * per, h1 * per
        if leaf in ("k_proj", "v_proj"):
            k0, k1 = shard.kv_heads(H, cfg.num_key_value_heads)
            per = shape[0] // cfg.num_key_value_heads
            return 0, k0 * per, k1 * per
        if leaf == "o_proj" and kind == "weight":
            h0, h1 = shard.heads(H)
            per = shape[1] // H
            return 1, h0 * per, h1 * per
        return None
    if m := _MLP.search(name):
        leaf, kind = m.groups()
        if leaf == "down_proj":
            return (1, *shard.rows(shape[1])) if kind == "weight" else None
        return (0, *shard.rows(shape[0]))
    return None


def expert_cut(part: str, shape: tuple[int, ...], shard: Shard) -> Cut:
    """This rank's slice of one routed expert's matrix: part "gate"/"up" [I, D] or "down" [D, I]."""
    if part == "down":
        return 1, *shard.expert_rows(shape[1])
    return 0, *shard.expert_rows(shape[0])


def take(tensor, c: Cut | None) -> torch.Tensor:
    """The slice `c` of a tensor, or of a safetensors slice (which then reads only those bytes)."""
    if c is None:
        return tensor[:]
    dim, start, stop = c
    return tensor[start:stop] if dim == 0 else tensor[:, start:stop]


def shard_state(state: dict[str, torch.Tensor], cfg: ModelConfig, shard: Shard) -> dict[str, torch.Tensor]:
    """A whole model's state cut to one rank's part (parameters a rank does not hold are left out)."""
    if not shard.sharded:
        return state
    out = {}
    for name, t in state.items():
        if name.endswith(("o_proj.bias", "down_proj.bias")) and not shard.holds_bias_of_reduced_output:
            continue
        if m := _STACKED.search(name):
            e0, e1 = shard.experts(t.shape[0])
            t = t[e0:e1]
            if m.group(1) == "gate_up_proj":  # [E, 2I, D]: gate rows then up rows, each cut alike
                gate, up = t.chunk(2, dim=1)
                r0, r1 = shard.expert_rows(gate.shape[1])
                t = torch.cat([gate[:, r0:r1], up[:, r0:r1]], dim=1)
            else:  # [E, D, I]
                r0, r1 = shard.expert_rows(t.shape[2])
                t = t[:, :, r0:r1]
            out[name] = t.contiguous()
            continue
        out[name] = take(t, cut(name, tuple(t.shape), cfg, shard)).contiguous()
    return out


def block_cut(c: Cut | None, shape: tuple[int, ...], block: tuple[int, int], key: str) -> Cut | None:
    """The scales' slice for a weight slice `c` of an FP8 weight of `shape` (block scales): the
    slice must start on a block edge and end on one or at the weight's end."""
    if c is None:
        return None
    dim, start, stop = c
    b = block[dim]
    if start % b or (stop % b and stop != shape[dim]):
        raise ValueError(
            f"tensor {key!r}: this rank's slice [{start}, {stop}) of dimension {dim} (size {shape[dim]}) does "
            f"not fall on the FP8 scale blocks of {b}: use a --tensor-parallel-size that splits it on block "
            "edges (or --enable-expert-parallel for expert weights)"
        )
    return dim, start // b, -(-stop // b)
