"""Decode attention on the GPU that reads the paged KV cache in place: a Triton kernel.

On CUDA a decode step's attention used to gather every sequence's whole context out of the cache
into a dense [S, L, ...] tensor at every layer (models/model.py: `gather_slots`, then two batched
matmuls padded to the longest context), as on the CPU before csrc/paged_attention.c. `decode`
here does what that C kernel does, the GPU way (as vLLM's and SGLang's Triton decode kernels do):
one program per (sequence, kv head, block of its query heads) walks the sequence's block table
BLOCK_N positions at a time, loads those key and value rows where they lie, and keeps an online
softmax in float32; the query heads that share a kv head (GQA, or MLA's one latent head) read each
row once, as one `tl.dot`. Same arguments and results as `paged_attention.decode` (the CPU's):
GQA, MLA's absorbed decode (the keys whole cache rows, the values their first C columns, the
queries' rope part apart), a sliding window.

Triton is what PyTorch's CUDA wheels bring. No GPU has run this yet (none was lent to this
project's sessions): the kernel is checked on the CPU by Triton's interpreter (TRITON_INTERPRET=1,
Triton's own debugging mode, where the kernel runs on CPU tensors; its `tl.dot` on bfloat16 is
wrong there, so under it the operands are widened to float32 first) against the torch path, in
tests/runtime/test_triton_attention.py, and `tests/gpu` has its CUDA test. Should the kernel fail
to compile on a device, the failure is logged once, that call is answered by the torch path, and
`applies` says no from then on (the gather path serves, as before); MOE_RUNTIME_TRITON_ATTENTION=0
keeps the gather path from the start. Triton also compiles the kernel ahead of time for sm_80 and
sm_90 on a machine without a GPU (its bundled ptxas), which the tests do, so a kernel that would not
build for those devices fails here first.

A long context shared by few sequences would leave most of a GPU idle with one program per
(sequence, kv head): `splits` programs then share each context (flash-decoding), each writing its
unnormalized sums, running max and sum, which a second small kernel joins (`_join_splits`).
A prefill (several new tokens a sequence) takes `prefill`, the same walk per (sequence, block of
its new tokens, query head), causal in the kernel: no sequence padded to the longest; MLA's, whose
context is expanded per head first (kv_b_proj), takes `prefill_expanded`: the same kernel on the
expanded keys and values as they lie, the rope keys apart (nothing concatenated or padded).
"""

from __future__ import annotations

import logging
import os
import threading

import torch

log = logging.getLogger(__name__)

DTYPES = (torch.bfloat16, torch.float16, torch.float32)

_lock = threading.Lock()
_kernels: dict[tuple[str, bool], object] = {}  # the jitted kernels, by name and whether Triton interprets them
_failed: str | None = None  # why the kernel is off: no Triton here, or it failed to compile on this device
triton = tl = None  # imported on first use (a CPU server never needs them)


def _import() -> bool:
    """Whether Triton imports (once; its modules then the globals the kernel's body names)."""
    global triton, tl, _failed
    if triton is None and _failed is None:
        try:
            import triton as triton_module
            import triton.language as tl_module
        except Exception as e:  # noqa: BLE001 (no Triton, or a broken one: the torch path serves)
            _failed = f"triton does not import: {e}"
        else:
            triton, tl = triton_module, tl_module
    return triton is not None


# Read once: Triton's interpreter is on only if TRITON_INTERPRET=1 was set before Triton was first
# imported, so a later change could not take effect anyway; and the CPU's dispatch asks every layer.
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


def interpreting() -> bool:
    """Whether Triton runs kernels in its interpreter (TRITON_INTERPRET=1 at start): on CPU
    tensors, slowly."""
    return _INTERPRET


def available() -> bool:
    """Whether Triton imports here and the kernel has not failed on this device."""
    return _import() and _failed is None


def applies(q: torch.Tensor, cache: torch.Tensor, max_new: int, uniform: bool) -> bool:
    """Whether decode() serves this step: one new token per sequence (max_new 1, no padding), q
    and cache of one dtype (bfloat16, float16 or float32) on CUDA (or on the CPU under Triton's
    interpreter), outside autograd, the kernel available, not switched off
    (MOE_RUNTIME_TRITON_ATTENTION=0: the gathered torch path)."""
    return (
        max_new == 1
        and uniform
        and q.dtype in DTYPES
        and cache.dtype == q.dtype
        and (q.device.type == "cuda" or (interpreting() and q.device.type == "cpu"))
        and not (torch.is_grad_enabled() and q.requires_grad)
        and os.environ.get("MOE_RUNTIME_TRITON_ATTENTION", "1") != "0"
        and available()
    )


def _kernel(fn=None):
    """A Triton kernel of this module (the decode one by default), jitted on first use (compiled or
    interpreted, as TRITON_INTERPRET says then)."""
    fn = fn or _paged_decode
    key = (fn.__name__, interpreting())
    if not _import():
        raise RuntimeError(_failed)
    with _lock:
        if key not in _kernels:
            _kernels[key] = triton.jit(fn)
        return _kernels[key]


def _paged_decode(
    Q, QR, K, V, TABLES, LENS, OUT, PART, PML,
    sq_s, sq_h, sqr_s, sqr_h, sk_slot, sk_head, sv_slot, sv_head, st_s, so_s, so_h,
    scale, window, block_size,
    G: tl.constexpr, H: tl.constexpr, E1: tl.constexpr, E2: tl.constexpr, EV: tl.constexpr,
    BLOCK_G: tl.constexpr, BLOCK_E1: tl.constexpr, BLOCK_E2: tl.constexpr, BLOCK_EV: tl.constexpr,
    BLOCK_N: tl.constexpr, GROUPS: tl.constexpr, SPLITS: tl.constexpr, HAS_ROPE: tl.constexpr,
    WIDEN: tl.constexpr,
):  # fmt: skip
    # one program: sequence s, kv head kv, its query heads kv * G + [gb * BLOCK_G, + BLOCK_G), and
    # split `split` of SPLITS even runs of the context (whole BLOCK_N chunks)
    s = tl.program_id(0)
    kv = tl.program_id(1) // GROUPS
    g = (tl.program_id(1) % GROUPS) * BLOCK_G + tl.arange(0, BLOCK_G)
    split = tl.program_id(2)
    g_ok = g < G
    h = kv * G + g
    e1 = tl.arange(0, BLOCK_E1)
    e1_ok = e1 < E1
    q = tl.load(Q + s * sq_s + h[:, None] * sq_h + e1[None, :], mask=g_ok[:, None] & e1_ok[None, :], other=0.0)
    if WIDEN:
        q = q.to(tl.float32)
    e2 = tl.arange(0, BLOCK_E2)
    e2_ok = e2 < E2
    if HAS_ROPE:
        qr = tl.load(QR + s * sqr_s + h[:, None] * sqr_h + e2[None, :], mask=g_ok[:, None] & e2_ok[None, :],
                     other=0.0)  # fmt: skip
        if WIDEN:
            qr = qr.to(tl.float32)
    ev = tl.arange(0, BLOCK_EV)
    ev_ok = ev < EV
    length = tl.load(LENS + s).to(tl.int32)
    first = tl.maximum(length - window, 0)  # no window: the host passes 2**30 (no branch)
    per = tl.cdiv(tl.cdiv(length - first, SPLITS), BLOCK_N) * BLOCK_N
    start = first + split * per
    stop = tl.minimum(start + per, length)
    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_EV], tl.float32)
    for n0 in range(start, stop, BLOCK_N):
        pos = n0 + tl.arange(0, BLOCK_N)
        p_ok = pos < stop
        block = tl.load(TABLES + s * st_s + pos // block_size, mask=p_ok, other=0)
        slot = block.to(tl.int64) * block_size + pos % block_size
        k = tl.load(K + slot[:, None] * sk_slot + kv * sk_head + e1[None, :], mask=p_ok[:, None] & e1_ok[None, :],
                    other=0.0)  # fmt: skip
        if WIDEN:  # float32 products as float32 ("ieee": not TF32's 10-bit mantissa on the GPU)
            scores = tl.dot(q, tl.trans(k.to(tl.float32)), input_precision="ieee")  # [BLOCK_G, BLOCK_N]
        else:
            scores = tl.dot(q, tl.trans(k))
        if HAS_ROPE:
            kr = tl.load(K + slot[:, None] * sk_slot + kv * sk_head + E1 + e2[None, :],
                         mask=p_ok[:, None] & e2_ok[None, :], other=0.0)  # fmt: skip
            if WIDEN:
                scores += tl.dot(qr, tl.trans(kr.to(tl.float32)), input_precision="ieee")
            else:
                scores += tl.dot(qr, tl.trans(kr))
        scores = tl.where(p_ok[None, :], scores * scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(scores, 1))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(scores - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(V + slot[:, None] * sv_slot + kv * sv_head + ev[None, :], mask=p_ok[:, None] & ev_ok[None, :],
                    other=0.0)  # fmt: skip
        if WIDEN:
            acc = acc * alpha[:, None] + tl.dot(p, v.to(tl.float32), input_precision="ieee")
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new
    if SPLITS == 1:
        out = acc / l_i[:, None]
        tl.store(OUT + s * so_s + h[:, None] * so_h + ev[None, :], out.to(OUT.dtype.element_ty),
                 mask=g_ok[:, None] & ev_ok[None, :])  # fmt: skip
    else:  # this split's unnormalized sums, its running max and sum (an empty split: -inf, 0, 0)
        row = (s * H + h) * SPLITS + split  # [BLOCK_G] of PART [S, H, SPLITS, EV], PML [S, H, SPLITS, 2]
        tl.store(PART + row[:, None] * EV + ev[None, :], acc, mask=g_ok[:, None] & ev_ok[None, :])
        tl.store(PML + row * 2, m_i, mask=g_ok)
        tl.store(PML + row * 2 + 1, l_i, mask=g_ok)


def _tiles(H: int, K: int, E1: int, E2: int, Ev: int) -> dict[str, int]:
    """The kernel's shape constants for H query heads on K kv heads, keys of E1 (+ E2 rope)
    columns, values of Ev: tiles of at least 16 (tl.dot's least), powers of two; MLA's wide latent
    rows (256 columns or more) in smaller blocks of heads and positions (the sums stay in registers)."""
    G = H // K
    BLOCK_E1, BLOCK_EV = _block(E1), _block(Ev)
    wide = max(BLOCK_E1, BLOCK_EV) >= 256
    BLOCK_G = min(_block(G), 16 if wide else 64)
    return dict(
        G=G, H=H, E1=E1, E2=max(E2, 1), EV=Ev, BLOCK_G=BLOCK_G, BLOCK_E1=BLOCK_E1, BLOCK_E2=_block(E2),
        BLOCK_EV=BLOCK_EV, BLOCK_N=16 if wide else 32, GROUPS=-(-G // BLOCK_G),
    )  # fmt: skip


_multiprocessors: dict[int, int] = {}


def _splits(device: torch.device, programs: int, longest: int, block_n: int) -> int:
    """How many programs share a sequence's context: one where the step's (sequence, kv head, head
    group) programs already fill the GPU twice over; else enough to, at most 16, each at least four
    chunks of the longest context the block tables can hold (their width: no sync to learn it)."""
    if device.type != "cuda":
        return 1
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _multiprocessors:
        _multiprocessors[index] = torch.cuda.get_device_properties(index).multi_processor_count
    want = -(-2 * _multiprocessors[index] // programs)
    return max(1, min(want, 16, longest // (4 * block_n)))


def _join_splits(PART, PML, OUT, so_s, so_h, H: tl.constexpr, EV: tl.constexpr, SPLITS: tl.constexpr,
                 BLOCK_S: tl.constexpr, BLOCK_EV: tl.constexpr):  # fmt: skip
    # sequence s, head h: its splits' sums [SPLITS, EV] weighted by exp(their max - the max of all),
    # over their weighted sums of exponentials (an empty split: max -inf, weight 0)
    s = tl.program_id(0)
    h = tl.program_id(1)
    j = tl.arange(0, BLOCK_S)
    j_ok = j < SPLITS
    ev = tl.arange(0, BLOCK_EV)
    row = (s * H + h) * SPLITS + j
    m = tl.load(PML + row * 2, mask=j_ok, other=float("-inf"))
    total = tl.load(PML + row * 2 + 1, mask=j_ok, other=0.0)
    weight = tl.exp(m - tl.max(m, 0))
    weight = tl.where(j_ok, weight, 0.0)
    part = tl.load(PART + row[:, None] * EV + ev[None, :], mask=j_ok[:, None] & (ev < EV)[None, :], other=0.0)
    out = tl.sum(part * weight[:, None], 0) / tl.sum(total * weight, 0)
    tl.store(OUT + s * so_s + h * so_h + ev, out.to(OUT.dtype.element_ty), mask=ev < EV)


def _block(n: int) -> int:
    """A tile dimension for n: a power of two, at least 16 (tl.dot's least)."""
    return max(16, 1 << max(0, n - 1).bit_length())


def decode(
    q: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    block_size: int,
    scale: float,
    window: int | None,
    out: torch.Tensor | None = None,
    q_rope: torch.Tensor | None = None,
    splits: int | None = None,
) -> torch.Tensor:
    """One new token per sequence attends its cached context, read in place (the arguments and
    result of kernels/paged_attention.py: decode): q [S, H, E1] (or [S, H, E] without q_rope),
    q_rope [S, H, E2] the queries' last E2 columns apart; keys [slots, K, E1 + E2] and values
    [slots, K, Ev] views of the cache, rows contiguous; -> [S, H, Ev] in q's dtype, into `out`
    when given (rows contiguous, any other strides). `splits`: how many programs share each
    sequence's context (flash-decoding: their softmaxes joined after), by default enough to give
    the device's multiprocessors two programs each where the step's sequences and heads do not."""
    global _failed
    S, H, E1 = q.shape
    E2 = 0 if q_rope is None else q_rope.shape[2]
    K, Ev = keys.shape[1], values.shape[2]
    if keys.shape[2] != E1 + E2 or H % K or keys.stride(2) != 1 or values.stride(2) != 1:
        raise ValueError(f"paged decode: q {tuple(q.shape)} does not fit keys {tuple(keys.shape)}")
    if q_rope is not None and (q_rope.shape[:2] != (S, H) or q_rope.dtype != q.dtype):
        raise ValueError(f"paged decode: q_rope {tuple(q_rope.shape)} {q_rope.dtype} does not fit q {tuple(q.shape)}")
    dtype = q.dtype
    if dtype not in DTYPES or keys.dtype != dtype or values.dtype != dtype:
        raise ValueError(f"paged decode: q {dtype}, keys {keys.dtype}, values {values.dtype}: not one float dtype")
    if out is None:
        out = torch.empty(S, H, Ev, dtype=dtype, device=q.device)
    elif out.shape != (S, H, Ev) or out.dtype != dtype or out.stride(2) != 1:
        raise ValueError(f"paged decode: out {tuple(out.shape)} {out.dtype} is not [{S}, {H}, {Ev}] {dtype} rows")
    if S == 0:
        return out
    q = q if q.stride(2) == 1 else q.contiguous()
    if q_rope is not None and q_rope.stride(2) != 1:
        q_rope = q_rope.contiguous()
    tables = block_tables.to(torch.int32).contiguous()
    lens = context_lens.to(torch.int32).contiguous()
    tiles = _tiles(H, K, E1, E2, Ev)
    if splits is None:
        splits = _splits(q.device, S * K * tiles["GROUPS"], block_tables.shape[1] * block_size, tiles["BLOCK_N"])
    part = pml = out  # unused with one split
    if splits > 1:
        part = torch.empty(S, H, splits, Ev, dtype=torch.float32, device=q.device)
        pml = torch.empty(S, H, splits, 2, dtype=torch.float32, device=q.device)
    rope = q_rope if q_rope is not None else q
    try:
        _kernel()[(S, K * tiles["GROUPS"], splits)](
            q, rope, keys, values, tables, lens, out, part, pml,
            q.stride(0), q.stride(1), rope.stride(0), rope.stride(1),
            keys.stride(0), keys.stride(1), values.stride(0), values.stride(1), tables.stride(0),
            out.stride(0), out.stride(1),
            float(scale), int(window or 1 << 30), int(block_size),
            **tiles, SPLITS=splits, HAS_ROPE=q_rope is not None, WIDEN=interpreting() or dtype == torch.float32,
        )  # fmt: skip
        if splits > 1:  # the splits' softmaxes joined: one more launch, a program per (sequence, head)
            _kernel(_join_splits)[(S, H)](
                part, pml, out, out.stride(0), out.stride(1),
                H=H, EV=Ev, SPLITS=splits, BLOCK_S=_block(splits), BLOCK_EV=tiles["BLOCK_EV"],
            )  # fmt: skip
    except Exception as e:  # noqa: BLE001 (a kernel that does not build here: the torch path, said once)
        if interpreting():
            raise
        _failed = f"{type(e).__name__}: {e}"
        log.warning("triton paged decode: off on %s (%s); the gathered torch path serves", q.device, _failed)
        out.copy_(reference_decode(q, keys, values, block_tables, context_lens, block_size, scale, window, q_rope))
    return out


def reference_decode(q, keys, values, block_tables, context_lens, block_size, scale, window, q_rope=None):
    """decode() by torch ops, a sequence at a time: its context's rows gathered through its block
    table, attended in float32. The fallback where the kernel does not build, and a reference."""
    if q_rope is not None:
        q = torch.cat([q, q_rope], dim=-1)
    S, H, _ = q.shape
    K = keys.shape[1]
    out = torch.empty(S, H, values.shape[2], dtype=q.dtype, device=q.device)
    for s in range(S):
        n = int(context_lens[s])
        first = max(0, n - window) if window else 0
        pos = torch.arange(first, n, device=q.device)
        slots = block_tables[s, pos // block_size].long() * block_size + pos % block_size
        k = keys[slots].float().repeat_interleave(H // K, dim=1)  # [n, H, E]
        v = values[slots].float().repeat_interleave(H // K, dim=1)  # [n, H, Ev]
        probs = (torch.einsum("he,nhe->hn", q[s].float(), k) * scale).softmax(dim=-1)
        out[s] = torch.einsum("hn,nhe->he", probs, v).to(q.dtype)
    return out


# ---- prefill ---------------------------------------------------------------------------------


def prefill_applies(q: torch.Tensor, cache: torch.Tensor) -> bool:
    """Whether this step's attention of several new tokens a sequence takes a kernel here: prefill()
    for grouped-query attention (a cache [2, slots, K, Dh]), prefill_expanded() for MLA's (a cache
    [slots, C + R]); q and cache of one dtype on CUDA (or on the CPU under the interpreter),
    outside autograd, the kernel on."""
    return applies(q, cache[0] if cache.dim() == 4 else cache, 1, True)


def prefill(
    q: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    query_start: torch.Tensor,
    block_size: int,
    scale: float,
    window: int | None,
    max_new: int,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Several new tokens a sequence attend their context in the cache, read in place, causally
    (kernels/paged_attention.py: prefill's arguments): q [N, H, E], sequence s's new tokens its
    rows query_start[s] .. query_start[s + 1] - 1, at the last positions of its context_lens[s],
    their keys and values already written; keys [slots, K, E], values [slots, K, Ev] views of the
    cache (rows contiguous); max_new: the most new tokens of any sequence (the grid's size, known
    on the host). -> [N, H, Ev] in q's dtype, into `out` when given. No sequence is padded to the
    longest: one program per (sequence, BLOCK_M of its new tokens, query head)."""
    S = block_tables.shape[0]
    if keys.dim() != 3 or values.dim() != 3 or query_start.shape[0] != S + 1:
        raise ValueError(f"paged prefill: q {tuple(q.shape)} does not fit keys {tuple(keys.shape)}")
    return _launch_prefill(q, keys, None, values, block_tables.to(torch.int32).contiguous(), context_lens,
                           query_start, block_size, 0, scale, window, max_new, out)  # fmt: skip


def prefill_expanded(
    q: torch.Tensor,
    k_nope: torch.Tensor,
    k_rope: torch.Tensor,
    values: torch.Tensor,
    context_lens: torch.Tensor,
    query_start: torch.Tensor,
    scale: float,
    window: int | None,
    max_new: int,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """MLA's prefill over its context expanded into per-head keys and values (kernels/
    paged_attention.py: prefill_expanded's arguments): q [N, H, P + R] (the rope part rotated);
    k_nope [S, L, H, P], values [S, L, H, Dv] (kv_b_proj's output, split), k_rope [S, L, R] (the
    rope key each head shares), position t of sequence s at [s, t] of each (dim 0's stride L times
    dim 1's): read as they lie, neither concatenated nor padded. -> [N, H, Dv] in q's dtype."""
    S, L, H, P = k_nope.shape
    if (
        k_rope.shape[:2] != (S, L) or values.shape[:3] != (S, L, H) or q.shape[1] != H
        or q.shape[2] != P + k_rope.shape[2] or query_start.shape[0] != S + 1
        or any(t.stride(0) != L * t.stride(1) for t in (k_nope, k_rope, values))
    ):  # fmt: skip
        raise ValueError(
            f"paged prefill: q {tuple(q.shape)} does not fit keys {tuple(k_nope.shape)} + {tuple(k_rope.shape)}, "
            f"values {tuple(values.shape)} (or their strides)"
        )
    keys = k_nope.flatten(0, 1)  # [S L, H, P]: slot s L + t
    rope = k_rope.flatten(0, 1)[:, None, :].expand(S * L, H, k_rope.shape[2])  # head stride 0
    return _launch_prefill(q, keys, rope, values.flatten(0, 1), None, context_lens, query_start, 0, L, scale, window,
                           max_new, out)  # fmt: skip


def _launch_prefill(q, keys, rope, values, tables, context_lens, query_start, block_size, dense_len, scale, window,
                    max_new, out):  # fmt: skip
    """_paged_prefill on keys [slots, K, E1] (+ rope [slots, K, E - E1] apart, else E1 = E) and
    values [slots, K, Ev]: the context paged (tables [S, B] int32, blocks of block_size) or dense
    (sequence s's position t at slot s dense_len + t)."""
    global _failed
    N, H, E = q.shape
    S = query_start.shape[0] - 1
    K, E1, Ev = keys.shape[1], keys.shape[2], values.shape[2]
    E2 = 0 if rope is None else rope.shape[2]
    if E1 + E2 != E or H % K or keys.stride(2) != 1 or values.stride(2) != 1 or (rope is not None and rope.stride(2) != 1):
        raise ValueError(f"paged prefill: q {tuple(q.shape)} does not fit keys {tuple(keys.shape)}")
    if q.dtype not in DTYPES or any(t.dtype != q.dtype for t in (keys, values) + ((rope,) if rope is not None else ())):
        raise ValueError(f"paged prefill: q {q.dtype}, keys {keys.dtype}, values {values.dtype}: not one float dtype")
    if out is None:
        out = torch.empty(N, H, Ev, dtype=q.dtype, device=q.device)
    elif out.shape != (N, H, Ev) or out.dtype != q.dtype or out.stride(2) != 1:
        raise ValueError(f"paged prefill: out {tuple(out.shape)} {out.dtype} is not [{N}, {H}, {Ev}] rows")
    if N == 0:
        return out
    q = q if q.stride(2) == 1 else q.contiguous()
    lens = context_lens.to(torch.int32).contiguous()
    starts = query_start.to(torch.int32).contiguous()
    kr = rope if rope is not None else keys
    tb = tables if tables is not None else lens
    BLOCK_M = 16 if max_new <= 16 else 64
    BLOCK_E1, BLOCK_EV = _block(E1), _block(Ev)
    BLOCK_N = 32 if max(BLOCK_E1, BLOCK_EV) >= 256 else 64
    try:
        _kernel(_paged_prefill)[(S, -(-max_new // BLOCK_M), H)](
            q, keys, kr, values, tb, lens, starts, out,
            q.stride(0), q.stride(1), keys.stride(0), keys.stride(1), kr.stride(0), kr.stride(1),
            values.stride(0), values.stride(1), tb.stride(0), out.stride(0), out.stride(1),
            float(scale), int(window or 1 << 30), int(block_size), int(dense_len),
            G=H // K, E1=E1, E2=max(E2, 1), EV=Ev, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_E1=BLOCK_E1,
            BLOCK_E2=_block(E2), BLOCK_EV=BLOCK_EV, HAS_ROPE=rope is not None, DENSE=tables is None,
            WIDEN=interpreting() or q.dtype == torch.float32,
        )  # fmt: skip
    except Exception as e:  # noqa: BLE001 (as decode(): the torch path, said once)
        if interpreting():
            raise
        _failed = f"{type(e).__name__}: {e}"
        log.warning("triton paged prefill: off on %s (%s); the gathered torch path serves", q.device, _failed)
        if rope is not None:  # one dense block a sequence
            keys = torch.cat([keys, rope], dim=-1)
            tables, block_size = torch.arange(S, device=q.device)[:, None], dense_len
        out.copy_(reference_prefill(q, keys, values, tables, context_lens, query_start, block_size, scale, window))
    return out


def _paged_prefill(
    Q, K, KR, V, TABLES, LENS, STARTS, OUT,
    sq_n, sq_h, sk_slot, sk_head, skr_slot, skr_head, sv_slot, sv_head, st_s, so_n, so_h,
    scale, window, block_size, dense_len,
    G: tl.constexpr, E1: tl.constexpr, E2: tl.constexpr, EV: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_E1: tl.constexpr, BLOCK_E2: tl.constexpr, BLOCK_EV: tl.constexpr,
    HAS_ROPE: tl.constexpr, DENSE: tl.constexpr, WIDEN: tl.constexpr,
):  # fmt: skip
    # one program: sequence s, its new tokens [mb * BLOCK_M, + BLOCK_M), query head h (kv head h // G)
    s = tl.program_id(0)
    mb = tl.program_id(1)
    h = tl.program_id(2)
    kv = h // G
    q0 = tl.load(STARTS + s)
    new = tl.load(STARTS + s + 1) - q0
    length = tl.load(LENS + s)
    rows = mb * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = rows < new
    pos_q = length - new + rows  # [BLOCK_M] each new token's position
    e1 = tl.arange(0, BLOCK_E1)
    e2 = tl.arange(0, BLOCK_E2)
    ev = tl.arange(0, BLOCK_EV)
    token = (q0 + rows).to(tl.int64)  # [BLOCK_M] rows of q and out (N H E may pass 2^31)
    q_at = Q + token[:, None] * sq_n + h * sq_h
    q = tl.load(q_at + e1[None, :], mask=m_ok[:, None] & (e1 < E1)[None, :], other=0.0)
    if WIDEN:
        q = q.to(tl.float32)
    if HAS_ROPE:  # the queries' last E2 columns, against the rope keys apart
        qr = tl.load(q_at + E1 + e2[None, :], mask=m_ok[:, None] & (e2 < E2)[None, :], other=0.0)
        if WIDEN:
            qr = qr.to(tl.float32)
    first = length - new + mb * BLOCK_M  # this block's first token's position
    lo = tl.maximum(first - window + 1, 0)
    hi = tl.minimum(first + BLOCK_M, length)
    hi = tl.where(mb * BLOCK_M < new, hi, lo)  # a block past the sequence's new tokens: nothing
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_EV], tl.float32)
    for n0 in range(lo, hi, BLOCK_N):
        pos = n0 + tl.arange(0, BLOCK_N)
        p_ok = pos < hi
        if DENSE:
            slot = s.to(tl.int64) * dense_len + pos
        else:
            block = tl.load(TABLES + s * st_s + pos // block_size, mask=p_ok, other=0)
            slot = block.to(tl.int64) * block_size + pos % block_size
        k = tl.load(K + slot[:, None] * sk_slot + kv * sk_head + e1[None, :], mask=p_ok[:, None] & (e1 < E1)[None, :],
                    other=0.0)  # fmt: skip
        if WIDEN:
            scores = tl.dot(q, tl.trans(k.to(tl.float32)), input_precision="ieee")
        else:
            scores = tl.dot(q, tl.trans(k))
        if HAS_ROPE:
            kr = tl.load(KR + slot[:, None] * skr_slot + kv * skr_head + e2[None, :],
                         mask=p_ok[:, None] & (e2 < E2)[None, :], other=0.0)  # fmt: skip
            if WIDEN:
                scores += tl.dot(qr, tl.trans(kr.to(tl.float32)), input_precision="ieee")
            else:
                scores += tl.dot(qr, tl.trans(kr))
        seen = p_ok[None, :] & (pos[None, :] <= pos_q[:, None]) & (pos[None, :] > pos_q[:, None] - window)
        scores = tl.where(seen, scores * scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(scores, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row that has seen nothing yet
        alpha = tl.exp(m_i - m_safe)
        p = tl.exp(scores - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(V + slot[:, None] * sv_slot + kv * sv_head + ev[None, :], mask=p_ok[:, None] & (ev < EV)[None, :],
                    other=0.0)  # fmt: skip
        if WIDEN:
            acc = acc * alpha[:, None] + tl.dot(p, v.to(tl.float32), input_precision="ieee")
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new
    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]  # rows past the new tokens: none seen, not stored
    tl.store(OUT + token[:, None] * so_n + h * so_h + ev[None, :], out.to(OUT.dtype.element_ty),
             mask=m_ok[:, None] & (ev < EV)[None, :])  # fmt: skip


def reference_prefill(q, keys, values, block_tables, context_lens, query_start, block_size, scale, window):
    """prefill() by torch ops, a sequence at a time (the fallback, and a reference)."""
    N, H, _ = q.shape
    K = keys.shape[1]
    out = torch.empty(N, H, values.shape[2], dtype=q.dtype, device=q.device)
    for s in range(block_tables.shape[0]):
        q0, q1, n = int(query_start[s]), int(query_start[s + 1]), int(context_lens[s])
        pos = torch.arange(n, device=q.device)
        slots = block_tables[s, pos // block_size].long() * block_size + pos % block_size
        k = keys[slots].float().repeat_interleave(H // K, dim=1)  # [n, H, E]
        v = values[slots].float().repeat_interleave(H // K, dim=1)
        pos_q = torch.arange(n - (q1 - q0), n, device=q.device)
        seen = pos[None, :] <= pos_q[:, None]
        if window:
            seen &= pos[None, :] > pos_q[:, None] - window
        scores = torch.einsum("the,nhe->thn", q[q0:q1].float(), k) * scale
        probs = scores.masked_fill(~seen[:, None, :], float("-inf")).softmax(dim=-1)
        out[q0:q1] = torch.einsum("thn,nhe->the", probs, v).to(q.dtype)
    return out
