"""The batched sampler of one engine step (a request's parameters: engine/requests.py).

Legend: S sequences sampled in this step, V vocabulary size.

Sampling draws each token with the exponential race (argmax of p / q, q ~ Exp(1)), which picks
token i with probability p_i. Each seeded request owns a `torch.Generator`, and its noise is
drawn for its own row only, so a seeded request samples the same tokens whatever else shares
its batch (and across preemption, which never re-samples a token).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from model_runtime.kernels.cpu_decode import argmax


@dataclass
class SampleRow:
    """What the sampler needs of one sequence in the batch."""

    temperature: float
    top_p: float
    top_k: int
    generator: torch.Generator | None  # per-request generator of a seeded request
    logprobs: int | None
    min_p: float = 0.0
    params: object | None = None  # SamplingParams, when it adjusts logits (penalties, logit_bias)
    prompt_ids: list[int] | None = None  # for repetition_penalty
    output_ids: list[int] | None = None  # for the presence, frequency and repetition penalties
    allowed: torch.Tensor | None = None  # [V] bool: the only tokens a grammar allows next (structured output)


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
    adjusted = adjust_logits(logits, rows)
    if all(t == 0 for t in temps):
        chosen = argmax(adjusted)  # [S] (on the CPU a C scan: torch's argmax is ~10x slower there)
    else:
        chosen = _sample_random(adjusted, rows, temps, generator)
    token_ids = chosen.tolist()
    return SampleResult(token_ids, _logprobs(logits, rows, chosen, token_ids))


def adjust_logits(logits: torch.Tensor, rows: list[SampleRow]) -> torch.Tensor:
    """The logits with each row's penalties and biases applied (a copy; `logits` as it was when no
    row has any), in vLLM's order and meanings:

    - repetition_penalty p (prompt and generated tokens, as transformers and vLLM): a logit > 0
      is divided by p, one <= 0 multiplied by p;
    - frequency_penalty f and presence_penalty r (generated tokens only, as OpenAI):
      logit -= f x count + r x (count > 0);
    - logit_bias: added to the named tokens' logits;

    and a structured-output row's tokens that its grammar does not allow are set to -inf (so neither
    greedy nor sampling, top-k, top-p nor min_p can pick them, whatever the bias).
    """
    if not any(r.params is not None or r.allowed is not None for r in rows):
        return logits
    out = logits.clone()
    V = logits.shape[1]
    for i, row in enumerate(rows):
        if row.allowed is not None:
            out[i].masked_fill_(~row.allowed, float("-inf"))
        params = row.params
        if params is None:
            continue
        if params.repetition_penalty != 1.0:
            seen = torch.zeros(V, dtype=torch.bool, device=logits.device)
            seen[torch.tensor((row.prompt_ids or []) + (row.output_ids or []), dtype=torch.long,
                              device=logits.device)] = True
            x = out[i]
            p = params.repetition_penalty
            out[i] = torch.where(seen, torch.where(x > 0, x / p, x * p), x)
        if (params.frequency_penalty or params.presence_penalty) and row.output_ids:
            counts = torch.bincount(torch.tensor(row.output_ids, dtype=torch.long, device=logits.device),
                                    minlength=V)[:V].to(out.dtype)
            out[i] -= params.frequency_penalty * counts + params.presence_penalty * (counts > 0).to(out.dtype)
        if params.logit_bias:
            ids = torch.tensor(list(params.logit_bias), dtype=torch.long, device=logits.device)
            out[i, ids] += torch.tensor(list(params.logit_bias.values()), dtype=out.dtype, device=logits.device)
    return out


def allowed_tokens(bitmasks, vocab_size: int, device: torch.device | str) -> torch.Tensor:
    """[G, V] bool from grammar bitmasks (numpy int32 [G, W]: bit i of word w allows token 32 w + i)."""
    words = torch.from_numpy(bitmasks).to(device)  # [G, W]
    bits = (words[:, :, None] >> torch.arange(32, dtype=torch.int32, device=device)) & 1  # [G, W, 32]
    return bits.reshape(words.shape[0], -1)[:, :vocab_size].bool()  # [G, V]


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
    min_ps = [r.min_p for r in rows]
    if any(m > 0 for m in min_ps):  # drop tokens less likely than min_p x the row's most likely one
        floor = torch.tensor(min_ps, dtype=probs.dtype, device=device)[:, None] * probs.amax(dim=-1, keepdim=True)
        probs = probs.masked_fill(probs < floor, 0.0)

    q = torch.empty_like(probs)
    q.exponential_(generator=generator)
    for i, r in enumerate(rows):
        if r.generator is not None and temps[i] > 0:
            q[i].exponential_(generator=r.generator)
    sampled = argmax(probs / q)  # [S]
    return torch.where(greedy, argmax(logits), sampled)


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


def prompt_logprobs(logits: torch.Tensor, token_ids: list[int], k: int, rows_per_pass: int = 512) -> list[dict]:
    """The logprob of each of `token_ids` [M] under the logits [M, V] that predict it (log-softmax
    of the raw logits, as generated tokens' logprobs), its rank (1: the most likely) and the top
    `k`: {"token_id", "logprob", "rank", "top": {token_id: logprob}} per row. Rows are taken
    `rows_per_pass` at a time, so a long prompt's log-softmax never holds more than that many
    vocabulary-wide rows at once."""
    out: list[dict] = []
    for start in range(0, len(token_ids), rows_per_pass):
        logp = logits[start : start + rows_per_pass].float().log_softmax(dim=-1)  # [R, V]
        ids = torch.tensor(token_ids[start : start + rows_per_pass], dtype=torch.long, device=logits.device)
        chosen = logp.gather(1, ids[:, None])  # [R, 1]
        ranks = ((logp > chosen).sum(dim=-1) + 1).tolist()  # [R]
        top_lp, top_ids = logp.topk(k, dim=-1) if k > 0 else (logp[:, :0], logp[:, :0].long())
        top_lp, top_ids = top_lp.tolist(), top_ids.tolist()
        for j, (token, lp) in enumerate(zip(ids.tolist(), chosen[:, 0].tolist(), strict=True)):
            out.append({"token_id": token, "logprob": lp, "rank": ranks[j],
                        "top": dict(zip(top_ids[j], top_lp[j], strict=True))})
    return out
