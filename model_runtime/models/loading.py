"""Load a model: a Hugging Face checkpoint directory or a builtin.

The model is built on the meta device (no memory, no init), the safetensors files are memory-mapped
and each tensor is read once, converted to the target dtype and device, and assigned in place.
`checkpoint_key_to_param` maps checkpoint names to ours (and `_param_to_checkpoint` back) by the
renames of each architecture's entry in models/architectures.py.

One rank of a tensor / expert parallel replica (`shard`) reads only its slices (models/sharding.py)
through safetensors' `get_slice`, and never touches another rank's experts: its host and device
memory hold its share of the weights, not the whole model.

A checkpoint tensor this runtime does not know (a quantization scale, a renamed weight) or of a
dtype it does not load (integers, FP8) is refused with a message naming it, never dropped or cast.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from model_runtime.distributed.shard import Shard
from model_runtime.kernels.fp8 import FP8, scale_shape, use_fp8
from model_runtime.models.architectures import architecture
from model_runtime.models.builtin import build_builtin
from model_runtime.models.config import ModelConfig
from model_runtime.models.model import SINGLE, Transformer
from model_runtime.models.sharding import block_cut, cut, expert_cut, shard_state, take

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
PART_ROWS = {"gate": 0, "up": 1}  # gate_up_proj holds the gate rows, then the up rows
FLOAT_DTYPES = {"F64", "F32", "F16", "BF16"}  # safetensors' names of what loads (cast to --dtype)


class CheckpointError(ValueError):
    """The checkpoint cannot be loaded: the message names the file and tensor."""


def resolve_dtype(dtype: torch.dtype | str) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        if dtype not in DTYPES.values():
            raise ValueError(f"dtype {dtype} is not supported; use one of {', '.join(DTYPES)}")
        return dtype
    name = str(dtype).removeprefix("torch.")
    if name not in DTYPES:
        raise ValueError(f"dtype {dtype!r} is not supported; use one of {', '.join(DTYPES)}")
    return DTYPES[name]


def resolve_device(device: torch.device | str | None) -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def load_model(
    src: str | os.PathLike,
    dtype: torch.dtype | str = torch.float32,
    device: torch.device | str = "cpu",
    shard: Shard = SINGLE,
    comm=None,
) -> Transformer:
    """A ready-to-run model (eval mode, no grad) from a checkpoint directory or `builtin:NAME`;
    with `shard` (and the replica's `comm`), one rank's part of it."""
    dtype, device = resolve_dtype(dtype), resolve_device(device)
    src = str(src)
    if src.startswith("builtin:"):
        whole = build_builtin(src.removeprefix("builtin:"), dtype=dtype, device="cpu")
        cfg, state = whole.config, whole.state_dict()
        if shard.sharded:
            state = shard_state(state, cfg, shard)
        if not shard.sharded and comm is None:
            return whole.to(device)
        with torch.device("meta"):
            model = Transformer(cfg, shard, comm)
        state = {k: v.to(device) for k, v in state.items()}
    else:
        path = checkpoint_dir(src)
        cfg = load_config(path)
        model = build_meta(cfg, path, shard, comm)
        state = read_state_dict(path, model, dtype, device)
    model.load_state_dict(state, strict=True, assign=True)
    model.init_buffers()  # rope frequencies etc. were left on the meta device
    return model.eval().requires_grad_(False)


def checkpoint_dir(src: str) -> Path:
    if src.startswith("hostpath://"):
        src = src.removeprefix("hostpath://")
    elif "://" in src:
        raise ValueError(
            f"model source {src!r}: only a local directory, hostpath:///PATH or builtin:NAME load here"
        )
    path = Path(src)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path}: no config.json; expected a Hugging Face checkpoint directory")
    return path


def load_config(path: str | os.PathLike) -> ModelConfig:
    config_file = Path(path) / "config.json"
    with open(config_file) as f:
        return ModelConfig.from_hf(json.load(f), source=str(config_file))


def build_meta(cfg: ModelConfig, path: Path, shard: Shard = SINGLE, comm=None) -> Transformer:
    """The model (one rank's part) on the meta device, with FP8 layers where the checkpoint's
    weights are FP8 (they have a `weight_scale_inv`)."""
    with torch.device("meta"):
        model = Transformer(cfg, shard, comm)
    if cfg.quant_method == "fp8":
        fp8 = fp8_params(path, cfg)
        if not fp8:
            raise CheckpointError(f"{path}: quantization_config says fp8 but no tensor has a weight_scale_inv")
        use_fp8(model, fp8, cfg.weight_block_size)
    return model


def fp8_params(path: Path, cfg: ModelConfig) -> set[str]:
    """Our names of the weights the checkpoint stores as FP8 (those with a `weight_scale_inv`)."""
    names = set()
    for file in checkpoint_files(path):
        with safe_open(str(file), framework="pt", device="cpu") as f:
            for key in f.keys():
                if key.endswith(SCALE_SUFFIX) and (mapped := checkpoint_key_to_param(key, cfg)) is not None:
                    names.add(mapped[0].removesuffix(SCALE_SUFFIX))  # the weight's (or stacked experts') name
    return names


def checkpoint_files(path: Path) -> list[Path]:
    """The safetensors files of a checkpoint: from model.safetensors.index.json, else all *.safetensors."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        with open(index) as f:
            weight_map = json.load(f)["weight_map"]
        files = sorted({path / name for name in weight_map.values()})
        for file in files:
            if not file.is_file():
                raise CheckpointError(f"{index}: lists {file.name}, which does not exist")
        return files
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{path}: no *.safetensors files (pickled .bin checkpoints are not supported)")
    return files


_LAYER = re.compile(r"^layers\.(\d+)\.")
_EXPERT = re.compile(r"^(layers\.\d+\.mlp\.experts)\.(\d+)\.(\w+)\.weight(_scale_inv)?$")
SCALE_SUFFIX = "_scale_inv"  # FP8 block scales: `X.weight_scale_inv` beside `X.weight`


def checkpoint_key_to_param(key: str, cfg: ModelConfig) -> tuple[str, int | None, str | None] | None:
    """Our parameter for a checkpoint tensor: (name, expert, part) or None for tensors we don't use.

    Names follow the architecture's entry in models/architectures.py. Per-expert tensors go into
    the stacked `experts.gate_up_proj` [E, 2I, D] (part "gate" or "up") and `experts.down_proj`
    [E, D, I].
    """
    name = key.removeprefix("model.")
    layer = _LAYER.match(name)
    if layer and int(layer.group(1)) >= cfg.num_hidden_layers:
        return None  # e.g. DeepSeek-V3's multi-token-prediction layer
    if name.endswith("rotary_emb.inv_freq"):
        return None
    arch = architecture(cfg.architecture)
    name = arch.param_name(name)
    expert = _EXPERT.match(name)
    part = arch.expert_part(expert.group(3)) if expert else None
    if part is not None:
        target = "gate_up_proj" if part in PART_ROWS else "down_proj"
        return f"{expert.group(1)}.{target}{expert.group(4) or ''}", int(expert.group(2)), part
    return name, None, None


def read_state_dict(path: Path, model: Transformer, dtype: torch.dtype, device: torch.device) -> dict:
    """Every tensor the model (one rank's part, if sharded) needs, read from the checkpoint, as
    `dtype` on `device` (FP8 weights stay FP8, their scales float32). Reads only this rank's slices
    and experts."""
    cfg, shard = model.config, model.shard
    expected = model.state_dict()  # meta tensors: names, this rank's shapes, FP8 where the checkpoint is
    whole = build_meta(cfg, path).state_dict() if cfg.quant_method else None
    if whole is None:
        with torch.device("meta"):
            whole = Transformer(cfg).state_dict()  # every tensor the model has, whole shapes
    block = cfg.weight_block_size
    state: dict[str, torch.Tensor] = {}
    expert_parts: dict[str, set[tuple[int, str]]] = {}
    unknown: list[str] = []
    e0, e1 = shard.experts(cfg.num_experts)
    for file in checkpoint_files(path):
        with safe_open(str(file), framework="pt", device="cpu") as f:
            for key in f.keys():
                mapped = checkpoint_key_to_param(key, cfg)
                if mapped is None:
                    continue
                name, expert, part = mapped
                if name not in whole:
                    unknown.append(key)
                    continue
                if name not in expected:
                    continue  # a bias another rank holds
                want = expected[name].dtype
                target = want if want in (FP8, torch.float32) and _stored_as_is(name, want) else dtype
                is_scale = name.endswith(SCALE_SUFFIX)
                if expert is None:
                    tensor = f.get_slice(key)
                    _check_dtype(file, key, tensor, want)
                    full = tuple(whole[name].shape)
                    if tuple(tensor.get_shape()) != full:
                        raise CheckpointError(
                            f"{file}: tensor {key!r} has shape {tensor.get_shape()}, expected {list(full)}"
                        )
                    if is_scale:  # the weight's slice, in blocks
                        weight = name.removesuffix(SCALE_SUFFIX)
                        c = block_cut(cut(weight, tuple(whole[weight].shape), cfg, shard), tuple(whole[weight].shape), block, key)
                    else:
                        c = cut(name, full, cfg, shard)
                    state[name] = owned(take(tensor, c), device, target)
                    continue
                if expert >= cfg.num_experts:
                    raise CheckpointError(
                        f"{file}: tensor {key!r}: expert {expert} but the config has {cfg.num_experts}"
                    )
                if not e0 <= expert < e1:
                    continue  # another rank's expert: not read
                stacked_whole = whole[name.removesuffix(SCALE_SUFFIX)].shape  # [E, 2I, D] or [E, D, I]
                weight_part = [stacked_whole[1] // 2 if part in PART_ROWS else stacked_whole[1], stacked_whole[2]]
                part_shape = list(scale_shape(*weight_part, block)) if is_scale else weight_part
                tensor = f.get_slice(key)
                _check_dtype(file, key, tensor, want)
                if list(tensor.get_shape()) != part_shape:
                    raise CheckpointError(
                        f"{file}: tensor {key!r} has shape {tensor.get_shape()}, expected {part_shape}"
                    )
                c = expert_cut(part, tuple(weight_part), shard)
                if is_scale:
                    c = block_cut(c, tuple(weight_part), block, key)
                stacked = state.get(name)
                if stacked is None:
                    stacked = state[name] = torch.empty(expected[name].shape, dtype=target, device=device)
                rows = expected[name].shape[1] // 2 if part in PART_ROWS else expected[name].shape[1]
                start = PART_ROWS.get(part, 0) * rows
                stacked[expert - e0, start : start + rows].copy_(take(tensor, c))
                expert_parts.setdefault(name, set()).add((expert, part))

    if unknown:
        shown = ", ".join(repr(k) for k in unknown[:5])
        more = f" and {len(unknown) - 5} more" if len(unknown) > 5 else ""
        hint = ""
        if any(k.endswith(("_scale_inv", "_scale", ".qweight", ".scales")) for k in unknown):
            hint = " (quantization scales: this checkpoint is quantized in a format this runtime does not load)"
        raise CheckpointError(
            f"{path}: tensor(s) {shown}{more} are not part of {cfg.architecture} as this runtime builds it{hint}; "
            "refusing to load rather than dropping them"
        )
    if cfg.tie_word_embeddings and "embed_tokens.weight" in state:
        state["lm_head.weight"] = state["embed_tokens.weight"]
    missing = [n for n in expected if n not in state]
    for name, got in expert_parts.items():
        parts = ("gate", "up") if name.removesuffix(SCALE_SUFFIX).endswith("gate_up_proj") else ("down",)
        missing += [f"{name}[expert {e}, {p}]" for e in range(e0, e1) for p in parts if (e, p) not in got]
    if missing:
        where = path / "model.safetensors.index.json"
        where = where if where.is_file() else path
        shown = ", ".join(_checkpoint_name(m, cfg) for m in missing[:5])
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise CheckpointError(f"{where}: missing tensor(s) {shown}{more}")
    return state


def owned(tensor: torch.Tensor, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """`tensor` (read from a safetensors file) as `dtype` on `device`, in memory of the process's
    own. safetensors hands out the file's mmap pages where no cast is needed, and `.to()` then
    returns them as they are: clean page-cache pages, the first the kernel drops when the pod nears
    its memory limit (page cache counts toward the cgroup's) or when a host reclaims idle pages
    (DAMON's pageout after 60 s idle on the machines this was measured on), to be read back from
    the checkpoint's volume at the next step. 228 MB of DeepSeek-V3-big's 933 (all but the stacked
    experts) were such pages. vLLM copies every weight into its own parameters too."""
    out = tensor.to(device=device, dtype=dtype)
    if out.device.type == "cpu" and out.untyped_storage().data_ptr() == tensor.untyped_storage().data_ptr():
        out = out.clone()
    return out


def _stored_as_is(name: str, dtype: torch.dtype) -> bool:
    """FP8 weights stay FP8; their scales and the routers' score-correction bias stay float32."""
    return dtype == FP8 or name.endswith(SCALE_SUFFIX) or name.endswith("e_score_correction_bias")


def _check_dtype(file: Path, key: str, tensor, want: torch.dtype) -> None:
    """Float weights load (cast to --dtype); FP8 only where the model holds an FP8 weight (a
    checkpoint with `quantization_config` fp8 and this tensor's `weight_scale_inv`)."""
    dtype = tensor.get_dtype()
    if want == FP8:
        if dtype != "F8_E4M3":
            raise CheckpointError(f"{file}: tensor {key!r} has dtype {dtype}; its weight_scale_inv says F8_E4M3")
        return
    if dtype not in FLOAT_DTYPES:
        if dtype.startswith("F8"):
            what = "FP8 without a weight_scale_inv, or without quantization_config fp8"
        else:
            what = "not a floating-point tensor"
        raise CheckpointError(
            f"{file}: tensor {key!r} has dtype {dtype} ({what}); this runtime loads {', '.join(sorted(FLOAT_DTYPES))} "
            "weights, and FP8 with block scales, and will not cast it"
        )


def _checkpoint_name(param: str, cfg: ModelConfig) -> str:
    """The checkpoint key a missing parameter would have had (for error messages)."""
    m = re.match(r"^(layers\.\d+\.mlp\.experts)\.(gate_up_proj|down_proj)\[expert (\d+), (\w+)\]$", param)
    arch = architecture(cfg.architecture)
    if m:
        prefix, _, e, part = m.groups()
        return f"'model.{arch.checkpoint_name(prefix)}.{e}.{arch.expert_names[part]}.weight'"
    if param.endswith("gate_up_proj") or param.endswith("experts.down_proj"):
        return f"'model.{param}' (all experts)"
    param = arch.checkpoint_name(param)
    return repr(param if param.startswith("lm_head") else f"model.{param}")


def save_checkpoint(model: Transformer, path: str | os.PathLike, max_shard_bytes: int | None = None) -> Path:
    """Write `model` as a Hugging Face checkpoint (config.json + safetensors, per-expert tensors
    named as the architecture names them), which `load_model` and transformers read back."""
    cfg, path = model.config, Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    for name, tensor in model.state_dict().items():
        if tensor.dtype == torch.int8 or name.endswith("_scale"):
            raise ValueError("save_checkpoint: the model is quantized; save the unquantized model")
        tensors.update(_param_to_checkpoint(name, tensor.detach().cpu(), cfg))
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key, tensor in tensors.items():
        nbytes = tensor.numel() * tensor.element_size()
        if max_shard_bytes and shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = tensor
        size += nbytes
    if len(shards) == 1:
        save_file(shards[0], str(path / "model.safetensors"), metadata={"format": "pt"})
    else:
        weight_map = {}
        for i, shard in enumerate(shards):
            file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, str(path / file), metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(shard, file))
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        with open(path / "model.safetensors.index.json", "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    hf = cfg.to_hf()
    hf["torch_dtype"] = str(model.dtype).removeprefix("torch.")
    with open(path / "config.json", "w") as f:
        json.dump(hf, f, indent=2)
    return path


def _param_to_checkpoint(name: str, tensor: torch.Tensor, cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """The checkpoint tensors of one of our parameters (the inverse of checkpoint_key_to_param)."""
    arch = architecture(cfg.architecture)
    name = arch.checkpoint_name(name)
    key = name if name.startswith("lm_head") else f"model.{name}"
    if name.endswith("experts.gate_up_proj"):
        prefix, rows = key.removesuffix(".gate_up_proj"), tensor.shape[1] // 2
        gate, up = arch.expert_names["gate"], arch.expert_names["up"]
        out = {}
        for e in range(tensor.shape[0]):
            out[f"{prefix}.{e}.{gate}.weight"] = tensor[e, :rows].clone()
            out[f"{prefix}.{e}.{up}.weight"] = tensor[e, rows:].clone()
        return out
    if name.endswith("experts.down_proj"):
        prefix = key.removesuffix(".down_proj")
        down = arch.expert_names["down"]
        return {f"{prefix}.{e}.{down}.weight": tensor[e].clone() for e in range(tensor.shape[0])}
    return {key: tensor}
