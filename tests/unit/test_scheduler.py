"""Scheduler and LLMEngine logic against a fake paged model.

The fake model's "KV cache" stores token ids at their slots; each sequence's logits are a
deterministic function of the whole context read back through its block table. So any mistake in
block tables, slot mapping, chunked prefill or preemption changes the tokens, and comparing with
the fake's full-sequence `forward` catches it.
"""

from types import SimpleNamespace

import pytest
import torch

from model_runtime.engine.block_manager import BlockManager
from model_runtime.engine.config import EngineConfig
from model_runtime.engine.core import LLMEngine
from model_runtime.engine.requests import EngineError, EngineOverloaded, SamplingParams
from model_runtime.engine.scheduler import Scheduler, Sequence

pytestmark = pytest.mark.unit

VOCAB = 256


class ByteTokenizer:
    eos_token_ids: set[int] = set()
    bos_token_id = None

    def encode(self, text: str) -> list[int]:
        return list(text.encode())

    def decode(self, ids: list[int]) -> str:
        return bytes(ids).decode("utf-8", errors="replace")


class FakePagedModel(torch.nn.Module):
    def __init__(self, max_len: int = 256, eos_token_id: int | None = None):
        super().__init__()
        self.config = SimpleNamespace(
            vocab_size=VOCAB, max_position_embeddings=max_len, eos_token_id=eos_token_id
        )
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.steps: list[tuple[int, int]] = []  # (sequences, tokens) of each forward_paged

    def kv_cache_bytes_per_token(self, dtype) -> int:
        return 8

    def allocate_kv_cache(self, num_blocks, block_size, dtype, device):
        return [torch.full((num_blocks * block_size,), -1, dtype=torch.long, device=device)]

    @staticmethod
    def _logits(context: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(1, len(context) + 1)
        h = int(((context + 1) * pos).sum()) * 1000003 + len(context)
        return torch.randn(VOCAB, generator=torch.Generator().manual_seed(h % (2**63)))

    def forward_paged(self, tokens, batch, kv_cache):
        cache = kv_cache[0]
        cache[batch.slot_mapping] = tokens
        self.steps.append((batch.num_seqs, batch.num_tokens))
        bs = batch.block_size
        out = []
        for i in range(batch.num_seqs):
            n = int(batch.context_lens[i])
            q0, q1 = int(batch.query_start[i]), int(batch.query_start[i + 1])
            assert int(batch.logits_indices[i]) == q1 - 1
            assert batch.positions[q0:q1].tolist() == list(range(n - (q1 - q0), n))
            pos = torch.arange(n)
            context = cache[batch.block_tables[i][pos // bs] * bs + pos % bs]
            assert (context >= 0).all(), "read a slot nobody wrote"
            out.append(self._logits(context))
        return torch.stack(out)

    def forward(self, input_ids):
        return torch.stack(
            [torch.stack([self._logits(row[: t + 1]) for t in range(len(row))]) for row in input_ids]
        )


def reference_greedy(model: FakePagedModel, prompt: list[int], n: int) -> list[int]:
    ids = list(prompt)
    for _ in range(n):
        ids.append(int(model.forward(torch.tensor([ids]))[0, -1].argmax()))
    return ids[len(prompt) :]


def run_all(engine: LLMEngine, max_steps: int = 10_000) -> dict:
    outs: dict[str, list] = {}
    for _ in range(max_steps):
        if not engine.has_unfinished():
            return outs
        for o in engine.step():
            outs.setdefault(o.request_id, []).append(o)
    raise AssertionError("engine did not finish")


def prompts(n: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(7)
    return [torch.randint(0, VOCAB, (int(3 + (i * 7) % 29),), generator=g).tolist() for i in range(n)]


# -- scheduler ------------------------------------------------------------------------------------


def seq(rid: str, n_prompt: int) -> Sequence:
    return Sequence(rid, list(range(n_prompt)), n_prompt, max_tokens=100)


def test_schedule_decodes_first_then_prefill_chunks_within_budget():
    sched = Scheduler(BlockManager(64, 4), max_num_seqs=8, max_num_batched_tokens=10)
    a, b = seq("a", 3), seq("b", 25)
    sched.add(a)
    sched.add(b)
    plan = sched.schedule()
    assert [(s.seq.request_id, s.num_new_tokens) for s in plan.scheduled] == [("a", 3), ("b", 7)]
    for s in plan.scheduled:
        s.seq.num_computed_tokens += s.num_new_tokens
    a.token_ids.append(1)  # a sampled its first token; b is mid-prefill
    plan = sched.schedule()
    assert [(s.seq.request_id, s.num_new_tokens) for s in plan.scheduled] == [("a", 1), ("b", 9)]
    assert plan.scheduled[0].samples and not plan.scheduled[1].samples


def test_schedule_respects_max_num_seqs_and_fifo():
    sched = Scheduler(BlockManager(64, 4), max_num_seqs=2, max_num_batched_tokens=100)
    for rid in "abc":
        sched.add(seq(rid, 2))
    plan = sched.schedule()
    assert [s.seq.request_id for s in plan.scheduled] == ["a", "b"]
    assert [s.request_id for s in sched.waiting] == ["c"]


def test_preemption_evicts_the_youngest_and_requeues_it_first():
    bm = BlockManager(4, 2)
    sched = Scheduler(bm, max_num_seqs=8, max_num_batched_tokens=100)
    a, b = seq("a", 4), seq("b", 4)
    sched.add(a)
    sched.add(b)
    for s in sched.schedule().scheduled:
        s.seq.num_computed_tokens += s.num_new_tokens
        s.seq.token_ids.append(0)
    assert bm.num_free_blocks == 0
    plan = sched.schedule()  # a needs a third block: b goes
    assert plan.preempted == [b] and [s.seq for s in plan.scheduled] == [a]
    assert b.num_computed_tokens == 0 and b.block_table == [] and sched.waiting[0] is b


# -- engine with the fake model -------------------------------------------------------------------


def test_concurrent_greedy_equals_alone_and_reference_with_chunking_and_preemption():
    model = FakePagedModel()
    ps = prompts(16)
    max_tokens = [5 + (i * 3) % 11 for i in range(16)]
    expected = [reference_greedy(model, p, m) for p, m in zip(ps, max_tokens, strict=True)]
    # a pool of 24 blocks x 4 tokens cannot hold 16 sequences of up to ~45 tokens: preemption
    engine = LLMEngine(model, None, EngineConfig(num_kv_blocks=24, block_size=4, max_num_batched_tokens=32))
    for i, p in enumerate(ps):
        engine.add_request(str(i), p, SamplingParams(max_tokens=max_tokens[i], temperature=0))
    outs = run_all(engine)
    assert engine.num_preemptions > 0
    assert max(n for _, n in model.steps) <= 32
    for i in range(16):
        final = outs[str(i)][-1]
        assert final.finished and final.finish_reason == "length"
        assert final.token_ids == expected[i], i
        assert [t for o in outs[str(i)] for t in o.new_token_ids] == expected[i]
    assert engine.blocks.usage == 0.0


def test_seeded_sampling_repeats_whatever_the_batch():
    model = FakePagedModel()
    params = SamplingParams(max_tokens=12, temperature=0.9, top_p=0.9, top_k=40, seed=1234)

    def run(others: int) -> list[int]:
        engine = LLMEngine(model, None, EngineConfig(num_kv_blocks=64, block_size=4))
        engine.add_request("x", [5, 6, 7], params)
        for i, p in enumerate(prompts(others)):
            engine.add_request(f"o{i}", p, SamplingParams(max_tokens=20, temperature=1.0))
        return run_all(engine)["x"][-1].token_ids

    alone = run(0)
    assert run(5) == alone and run(12) == alone
    engine = LLMEngine(model, None, EngineConfig(num_kv_blocks=64, block_size=4))
    engine.add_request("y", [5, 6, 7], SamplingParams(max_tokens=12, temperature=0.9, seed=99))
    assert run_all(engine)["y"][-1].token_ids != alone


def test_stop_strings_are_trimmed_across_token_boundaries_and_never_streamed():
    model = FakePagedModel()
    tok = ByteTokenizer()
    greedy = reference_greedy(model, list(b"Hi"), 30)
    text = tok.decode(greedy)
    stop = text[10:13]  # spans three tokens
    engine = LLMEngine(model, tok, EngineConfig(num_kv_blocks=64, block_size=4))
    engine.add_request("s", "Hi", SamplingParams(max_tokens=30, temperature=0, stop=[stop]))
    outs = run_all(engine)["s"]
    final = outs[-1]
    assert final.finish_reason == "stop"
    assert final.text == text[: text.index(stop)]
    assert "".join(o.new_text for o in outs) == final.text


def test_stop_token_ids_and_eos():
    model = FakePagedModel()
    greedy = reference_greedy(model, [1, 2, 3], 10)
    engine = LLMEngine(model, None, EngineConfig(num_kv_blocks=64, block_size=4))
    engine.add_request(
        "a", [1, 2, 3], SamplingParams(max_tokens=10, temperature=0, stop_token_ids=[greedy[4]])
    )
    final = run_all(engine)["a"][-1]
    assert final.finish_reason == "stop" and final.token_ids == greedy[: greedy.index(greedy[4]) + 1]

    eos_model = FakePagedModel(eos_token_id=greedy[2])
    for ignore_eos, n in ((False, greedy.index(greedy[2]) + 1), (True, 10)):
        engine = LLMEngine(eos_model, None, EngineConfig(num_kv_blocks=64, block_size=4))
        engine.add_request(
            "e", [1, 2, 3], SamplingParams(max_tokens=10, temperature=0, ignore_eos=ignore_eos)
        )
        assert len(run_all(engine)["e"][-1].token_ids) == n


def test_utf8_characters_are_never_split():
    tok = ByteTokenizer()

    class Scripted(FakePagedModel):  # emits the bytes of "é€x" one token at a time
        script = list("é€x".encode())

        def forward_paged(self, tokens, batch, kv_cache):
            super().forward_paged(tokens, batch, kv_cache)
            n = int(batch.context_lens[0]) - 1  # tokens so far (prompt is 1 token)
            logits = torch.zeros(1, VOCAB)
            logits[0, self.script[min(n, len(self.script) - 1)]] = 1.0
            return logits

    engine = LLMEngine(Scripted(), tok, EngineConfig(num_kv_blocks=16, block_size=4))
    engine.add_request("u", [65], SamplingParams(max_tokens=6, temperature=0))
    outs = run_all(engine)["u"]
    assert [o.new_text for o in outs] == ["", "é", "", "", "€", "x"]
    assert outs[-1].text == "é€x"


def test_abort_frees_blocks_at_once():
    model = FakePagedModel()
    engine = LLMEngine(model, None, EngineConfig(num_kv_blocks=64, block_size=4))
    engine.add_request("a", list(range(20)), SamplingParams(max_tokens=50, temperature=0))
    engine.add_request("b", list(range(9)), SamplingParams(max_tokens=50, temperature=0))
    engine.step()
    assert engine.blocks.usage > 0
    out = engine.abort_request("a")
    assert out.finished and out.finish_reason == "abort"
    assert engine.blocks.num_used_blocks == engine.blocks.blocks_for(10)
    assert engine.abort_request("a") is None
    engine.abort_request("b")
    assert engine.blocks.usage == 0.0 and not engine.has_unfinished()


def test_logprobs_report_chosen_and_top_n():
    model = FakePagedModel()
    engine = LLMEngine(model, None, EngineConfig(num_kv_blocks=64, block_size=4))
    engine.add_request("a", [1, 2], SamplingParams(max_tokens=3, temperature=0, logprobs=2))
    engine.add_request("b", [1, 2], SamplingParams(max_tokens=3, temperature=0))
    outs = run_all(engine)
    lps = [lp for o in outs["a"] for lp in o.logprobs]
    assert len(lps) == 3 and all(o.logprobs is None for o in outs["b"])
    ref = torch.log_softmax(model.forward(torch.tensor([[1, 2]]))[0, -1], -1)
    assert lps[0]["token_id"] == int(ref.argmax())
    assert lps[0]["logprob"] == pytest.approx(float(ref.max()), abs=1e-5)
    assert list(lps[0]["top"]) == ref.topk(2).indices.tolist()


@pytest.mark.parametrize(
    ("prompt", "params", "message"),
    [
        (list(range(64)), SamplingParams(), "model length is 64"),
        ([], SamplingParams(), "prompt is empty"),
        ([1, 999], SamplingParams(), "outside the vocabulary"),
        ([1], SamplingParams(max_tokens=0), "max_tokens"),
        ([1], SamplingParams(temperature=-1), "temperature"),
        ([1], SamplingParams(top_p=0), "top_p"),
        ([1], SamplingParams(top_k=-5), "top_k"),
        ([1], SamplingParams(logprobs=100), "logprobs"),
        ([1], SamplingParams(stop=[""]), "stop"),
        ([1], SamplingParams(stop_token_ids=[VOCAB]), "stop_token_ids"),
        ("text", SamplingParams(), "no tokenizer"),
    ],
)
def test_bad_requests_are_refused_with_a_clear_error(prompt, params, message):
    engine = LLMEngine(FakePagedModel(max_len=64), None, EngineConfig(num_kv_blocks=64, block_size=4))
    with pytest.raises(EngineError, match=message):
        engine.add_request("r", prompt, params)
    assert not engine.has_unfinished()


def test_max_tokens_is_clamped_to_the_model_length():
    engine = LLMEngine(FakePagedModel(max_len=16), None, EngineConfig(num_kv_blocks=64, block_size=4))
    engine.add_request("r", list(range(10)), SamplingParams(max_tokens=16, temperature=0))
    final = run_all(engine)["r"][-1]
    assert final.finish_reason == "length" and len(final.token_ids) == 6


def test_full_waiting_queue_raises_overloaded():
    engine = LLMEngine(FakePagedModel(), None, EngineConfig(num_kv_blocks=64, block_size=4, max_waiting=2))
    engine.add_request("a", [1], SamplingParams())
    engine.add_request("b", [1], SamplingParams())
    with pytest.raises(EngineOverloaded):
        engine.add_request("c", [1], SamplingParams())
    with pytest.raises(EngineError, match="already in use"):
        engine.add_request("a", [1], SamplingParams())


def test_a_prompt_longer_than_the_token_budget_is_prefilled_in_chunks():
    model = FakePagedModel()
    prompt = prompts(1)[0] * 30  # 90 tokens
    engine = LLMEngine(
        model, None, EngineConfig(num_kv_blocks=64, block_size=4, max_num_batched_tokens=16, max_num_seqs=4)
    )
    engine.add_request("long", prompt, SamplingParams(max_tokens=5, temperature=0))
    engine.add_request("short", [1, 2, 3], SamplingParams(max_tokens=8, temperature=0))
    outs = run_all(engine)
    assert model.steps[0] == (1, 16) and all(n <= 16 for _, n in model.steps)
    assert outs["long"][-1].token_ids == reference_greedy(model, prompt, 5)
    assert outs["short"][-1].token_ids == reference_greedy(model, [1, 2, 3], 8)


def test_engine_config_keeps_a_token_of_budget_per_sequence_and_refuses_nonsense():
    assert EngineConfig(max_num_seqs=64, max_num_batched_tokens=32).max_num_batched_tokens == 64
    with pytest.raises(ValueError, match="block_size"):
        EngineConfig(block_size=0)
