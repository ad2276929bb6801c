"""The CPU's batch-1 decode, applied to a built model: `use_cpu_decode_kernels` (the C kernels of
cpu_decode.py), else `use_decode_layout` (a weight layout that BLAS's gemv reads faster). The
engine applies one of them to a model on the CPU, after the other transforms (int8 quantization).

The kernels are a transform, not hooks in the model: each layer they can compute changes class
in place to a subclass below, whose forward calls the kernel for one float32 row (torch on one
thread, outside autograd: `cpu_decode.one_row`) and otherwise runs the layer's own torch code,
which stays the reference. Parameters, buffers, names and module identity are unchanged, so
state dicts, checkpoints and the engine's references to the model are unaffected; a second call
starts afresh (it first puts every layer back to its torch class).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from model_runtime.kernels import cpu_decode
from model_runtime.models.model import MLP, Experts, MLAttention, MoE, RMSNorm


class DecodeLinear(nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return cpu_decode.linear(x, self.weight, self.bias)


class DecodeRMSNorm(RMSNorm):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if cpu_decode.one_row(x) and cpu_decode.f32_rows(self.weight):
            return cpu_decode.rmsnorm(x, self.weight, self.eps)
        return super().forward(x)


class DecodeExperts(Experts):
    def expert_mlp(self, e: int, x: torch.Tensor) -> torch.Tensor:
        gate, up = cpu_decode.linear(x, self.gate_up_proj[e]).chunk(2, dim=-1)  # [n, I] each
        return cpu_decode.linear(self.act(gate).mul_(up), self.down_proj[e])


class DecodeMLP(MLP):
    decode: cpu_decode.SwiGLU

    def forward(self, x):
        if cpu_decode.one_row(x):  # batch-1 decode: one C call
            return self.decode(x)
        return super().forward(x)


class DecodeMoE(MoE):
    decode: cpu_decode.MoE

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if cpu_decode.one_row(x):  # batch-1 decode: router, experts and shared expert in one C call
            return self.decode(x)
        return super().forward(x)


class DecodeMLAttention(MLAttention):
    decode: cpu_decode.MLAttention

    def forward(self, x, cos, sin, ctx, cache):
        if cache is not None and cache.dtype == x.dtype and cpu_decode.one_row(x):  # one C call
            return self.decode(x, cos[0], sin[0], cache, int(ctx.slot_mapping[0]), ctx.context_slots[0])
        return super().forward(x, cos, sin, ctx, cache)


# Every layer whose batch-1 decode the kernels take (with or without a prepared `decode`).
DECODE_CLASS: dict[type[nn.Module], type[nn.Module]] = {
    nn.Linear: DecodeLinear,
    RMSNorm: DecodeRMSNorm,
    Experts: DecodeExperts,
    MLP: DecodeMLP,
    MoE: DecodeMoE,
    MLAttention: DecodeMLAttention,
}
TORCH_CLASS = {decode: torch_class for torch_class, decode in DECODE_CLASS.items()}
LEAVES = (nn.Linear, RMSNorm, Experts)  # need nothing prepared: their forward checks each call


def use_cpu_decode_kernels(model: nn.Module) -> bool:
    """Hand the batch-1 decode step of every layer the C kernels can compute to them (cpu_decode).

    A transform applied after the others (int8 quantization swaps in modules whose weights the
    kernels do not read): linear layers, RMSNorm and the experts' matmuls take the kernels' gemv
    and norm for one float32 row; MLA attention, MoE layers and SwiGLU MLPs with float32 weights
    and no biases get a prepared `decode` callable (one C call per layer). Every other case runs
    the torch code. Returns whether the kernels exist (False: the model is left as built).
    """
    for m in model.modules():
        if type(m) in TORCH_CLASS:  # a second call (after another transform) starts afresh
            m.__class__ = TORCH_CLASS[type(m)]
            m.__dict__.pop("decode", None)
    if not cpu_decode.available():
        return False
    prepared = [(m, decode) for m in model.modules() if (decode := _layer_kernel(m)) is not None]
    for m in model.modules():
        if type(m) in LEAVES:
            m.__class__ = DECODE_CLASS[type(m)]
    for m, decode in prepared:
        m.__class__ = DECODE_CLASS[type(m)]
        m.decode = decode
    return True


def _layer_kernel(m: nn.Module):
    """The prepared kernel for one MLA attention, MoE or MLP layer, or None (torch runs it)."""
    if type(m) is MLAttention:
        cfg = m.cfg
        lora = cfg.q_lora_rank is not None
        q = [m.q_a_proj, m.q_b_proj] if lora else [m.q_proj]
        if cfg.sliding_window is not None or not _no_bias(*q, m.kv_a_proj_with_mqa, m.kv_b_proj, m.o_proj):
            return None
        H, P, C, Dv = cfg.num_attention_heads, cfg.qk_nope_head_dim, cfg.kv_lora_rank, cfg.v_head_dim
        weights = [
            m.q_a_proj.weight if lora else None,
            m.q_a_layernorm.weight if lora else None,
            q[-1].weight,
            m.kv_a_proj_with_mqa.weight,
            m.kv_a_layernorm.weight,
            m.kv_b_proj.weight.view(H, P + Dv, C),
            m.o_proj.weight,
        ]
        return cpu_decode.MLAttention(*weights, cfg.rope_interleave, m.scale) if _rows(*weights) else None
    if type(m) is MLP:
        return _swiglu(m)
    if (
        type(m) is MoE
        and type(m.experts) is Experts
        and m.experts.act is F.silu
        and m.gate.cfg.num_experts_per_tok <= 64
    ):
        shared = getattr(m, "shared_experts", None)
        shared_decode = _swiglu(shared) if shared is not None else None
        if shared is not None and shared_decode is None:
            return None
        gate = getattr(m, "shared_expert_gate", None)
        bias = getattr(m.gate, "e_score_correction_bias", None)
        weights = [m.gate.weight, bias, m.experts.gate_up_proj, m.experts.down_proj]
        if (gate is None or _no_bias(gate)) and _rows(*weights, gate.weight if gate is not None else None):
            return cpu_decode.MoE(
                m.gate.cfg,
                *weights,
                shared_decode.weights if shared_decode is not None else None,
                gate.weight if gate is not None else None,
                m.tokens_per_expert,
            )
    return None


def _rows(*ws) -> bool:
    return all(w is None or cpu_decode.f32_rows(w) for w in ws)


def _no_bias(*linears) -> bool:
    return all(type(m) is nn.Linear and m.bias is None for m in linears)


def _swiglu(mlp: MLP) -> cpu_decode.SwiGLU | None:
    ok = mlp.act is F.silu and _no_bias(mlp.gate_proj, mlp.up_proj, mlp.down_proj)
    return (
        cpu_decode.SwiGLU(mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight)
        if ok and _rows(mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight)
        else None
    )


# ---- without the kernels -----------------------------------------------------------------------


def column_major(w: torch.Tensor) -> torch.Tensor:
    """The same [..., out, in] values stored in-major (strides swapped on the last two dims)."""
    return w.transpose(-1, -2).contiguous().transpose(-1, -2)


def use_decode_layout(model: nn.Module) -> nn.Module:
    """Store in place, column-major, the weights whose BLAS matrix-vector product that makes faster.

    For when the C decode kernels (cpu_decode) are not available; they read row-major weights.
    A decode step multiplies one row per sequence by every weight, so it is bound by how fast the
    weights stream from memory. On the CPU, MKL's gemv for x @ W.T over a row-major W [out, in]
    reads about 12 GB/s on one thread; over the same W stored column-major (x @ Wt with Wt [in, out]
    contiguous) it reads 13-20 GB/s when out >= in, and less when out < in; for bfloat16 it is
    ~5x slower, so only float32 weights move. Values, names and shapes are unchanged (only
    strides), and larger matmuls (prefill, 32 sequences) run alike.
    kv_b_proj stays row-major: MLA views it per head for the absorbed attention.
    """
    keep = {id(m.kv_b_proj) for m in model.modules() if isinstance(m, MLAttention)}
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Linear) and m.out_features >= m.in_features and id(m) not in keep:
                if m.weight.dtype == torch.float32:  # bf16/fp16 column-major gemv is ~5x slower
                    m.weight.data = column_major(m.weight.data)
            elif type(m) is Experts and m.gate_up_proj.dtype == torch.float32:  # not int8 or bf16
                m.gate_up_proj.data = column_major(m.gate_up_proj.data)  # [E, 2I, D]: 2I >= D typically
                m.down_proj.data = column_major(m.down_proj.data)  # [E, D, I]
    return model
