"""Sampling parameters of a request and the batched sampler of one engine step.

Legend: S sequences sampled in this step, V vocabulary size.

Sampling draws each token with the exponential race (argmax of p / q, q ~ Exp(1)), which picks
token i with probability p_i. Each seeded request owns a `torch.Generator`, and its noise is
drawn for its own row only, so a seeded request samples the same tokens whatever else shares
its batch (and across preemption, which never re-samples a token).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

MAX_LOGPROBS = 20


@dataclass
class SamplingParams:
    """How one request picks its tokens and when it stops."""

    max_tokens: int = 16
    temperature: float = 1.0  # 0 => greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 (or -1) => off
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: int | None = None  # top-n logprobs per generated token (0 = only the chosen token)

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):  # OpenAI accepts a single string
            self.stop = [self.stop]

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def validate(self, max_model_len: int) -> None:
        """Raise ValueError naming the first invalid field and the accepted range."""

        def is_int(x) -> bool:
            return isinstance(x, int) and not isinstance(x, bool)

        def is_num(x) -> bool:
            return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)

        if not is_int(self.max_tokens) or self.max_tokens < 1:
            raise ValueError(f"max_tokens must be an integer >= 1, got {self.max_tokens!r}")
        if self.max_tokens > max_model_len:
            raise ValueError(
                f"max_tokens ({self.max_tokens}) exceeds the model length ({max_model_len} tokens)"
            )
        if not is_num(self.temperature) or self.temperature < 0:
            raise ValueError(f"temperature must be a number >= 0 (0 = greedy), got {self.temperature!r}")
        if not is_num(self.top_p) or not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not is_int(self.top_k) or self.top_k < -1:
            raise ValueError(f"top_k must be an integer >= 0 (0 or -1 = off), got {self.top_k!r}")
        if self.seed is not None and not is_int(self.seed):
            raise ValueError(f"seed must be an integer, got {self.seed!r}")
        if not isinstance(self.stop, list) or not all(isinstance(s, str) and s for s in self.stop):
            raise ValueError(f"stop must be a list of non-empty strings, got {self.stop!r}")
        if not isinstance(self.stop_token_ids, list) or not all(is_int(t) for t in self.stop_token_ids):
            raise ValueError(f"stop_token_ids must be a list of integers, got {self.stop_token_ids!r}")
        if not isinstance(self.ignore_eos, bool):
            raise ValueError(f"ignore_eos must be a boolean, got {self.ignore_eos!r}")
        if self.logprobs is not None and (
            not is_int(self.logprobs) or not 0 <= self.logprobs <= MAX_LOGPROBS
        ):
            raise ValueError(f"logprobs must be an integer in [0, {MAX_LOGPROBS}], got {self.logprobs!r}")


@dataclass
class SampleRow:
    """What the sampler needs of one sequence in the batch."""

    temperature: float
    top_p: float
    top_k: int
    generator: torch.Generator | None  # per-request generator of a seeded request
    logprobs: int | None


@dataclass
class SampleResult:
    token_ids: list[int]  # [S]
    logprobs: list[dict | None]  # [S]: {"token_id", "logprob", "top": {token_id: logprob}} or None


def make_generator(seed: int, device: torch.device | str) -> torch.Generator:
    g = torch.Generator(device=device)
    g.manual_seed(seed)
    return g


def sample(
    logits: torch.Tensor, rows: list[SampleRow], generator: torch.Generator | None = None
) -> SampleResult:
    """One token per row of `logits` [S, V] (float32), vectorised across the batch.

    Logprobs are those of the model's distribution (log-softmax of the raw logits), before
    temperature, top-k and top-p, as vLLM and OpenAI report them.
    """
    S, V = logits.shape
    temps = [r.temperature for r in rows]
    if all(t == 0 for t in temps):
        chosen = logits.argmax(dim=-1)  # [S]
    else:
        chosen = _sample_random(logits, rows, temps, generator)
    token_ids = chosen.tolist()
    return SampleResult(token_ids, _logprobs(logits, rows, chosen, token_ids))


def _sample_random(
    logits: torch.Tensor, rows: list[SampleRow], temps: list[float], generator: torch.Generator | None
) -> torch.Tensor:
    S, V = logits.shape
    device = logits.device
    greedy = torch.tensor([t == 0 for t in temps], device=device)  # [S]
    t = torch.tensor([t if t > 0 else 1.0 for t in temps], dtype=logits.dtype, device=device)
    scaled = logits / t[:, None]  # [S, V]

    top_ks = [r.top_k if 0 < r.top_k < V else V for r in rows]
    top_ps = [r.top_p for r in rows]
    if any(p < 1 for p in top_ps):
        scaled = _mask_top_k_top_p(scaled, top_ks, top_ps)
    elif any(k < V for k in top_ks):
        scaled = _mask_top_k(scaled, top_ks)
    probs = scaled.softmax(dim=-1)  # [S, V]

    q = torch.empty_like(probs)
    q.exponential_(generator=generator)
    for i, r in enumerate(rows):
        if r.generator is not None and temps[i] > 0:
            q[i].exponential_(generator=r.generator)
    sampled = (probs / q).argmax(dim=-1)  # [S]
    return torch.where(greedy, logits.argmax(dim=-1), sampled)


def _mask_top_k(scaled: torch.Tensor, top_ks: list[int]) -> torch.Tensor:
    """`scaled` [S, V] with the logits below each row's k-th largest set to -inf (no full sort)."""
    top = scaled.topk(max(top_ks), dim=-1).values  # [S, K]
    kth = top.gather(
        1, torch.tensor(top_ks, device=scaled.device)[:, None].clamp(max=top.shape[1]) - 1
    )  # [S, 1]
    return scaled.masked_fill(scaled < kth, float("-inf"))


def _mask_top_k_top_p(scaled: torch.Tensor, top_ks: list[int], top_ps: list[float]) -> torch.Tensor:
    """`scaled` [S, V] with the logits outside each row's top-k and top-p nucleus set to -inf."""
    S, V = scaled.shape
    device = scaled.device
    sorted_logits, sorted_idx = scaled.sort(dim=-1, descending=True)  # [S, V]
    rank = torch.arange(V, device=device)[None, :]  # [1, V]
    drop = rank >= torch.tensor(top_ks, device=device)[:, None]  # [S, V]
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    probs = sorted_logits.softmax(dim=-1)
    # keep the smallest prefix whose mass reaches top_p (the first token always stays)
    mass_before = probs.cumsum(dim=-1) - probs
    top_p = torch.tensor(top_ps, dtype=probs.dtype, device=device)[:, None]
    sorted_logits = sorted_logits.masked_fill(mass_before >= top_p, float("-inf"))
    return torch.full_like(scaled, float("-inf")).scatter(-1, sorted_idx, sorted_logits)


def _logprobs(logits: torch.Tensor, rows: list[SampleRow], chosen: torch.Tensor, token_ids: list[int]):
    want = [i for i, r in enumerate(rows) if r.logprobs is not None]
    out: list[dict | None] = [None] * len(rows)
    if not want:
        return out
    idx = torch.tensor(want, device=logits.device)
    logp = logits.index_select(0, idx).log_softmax(dim=-1)  # [W, V]
    chosen_lp = logp.gather(1, chosen.index_select(0, idx)[:, None])[:, 0].tolist()  # [W]
    n = max(rows[i].logprobs for i in want)
    top_lp, top_ids = logp.topk(n, dim=-1) if n > 0 else (logp[:, :0], logp[:, :0].long())
    top_lp, top_ids = top_lp.tolist(), top_ids.tolist()
    for j, i in enumerate(want):
        k = rows[i].logprobs
        out[i] = {
            "token_id": token_ids[i],
            "logprob": chosen_lp[j],
            "top": dict(zip(top_ids[j][:k], top_lp[j][:k], strict=True)),
        }
    return out
