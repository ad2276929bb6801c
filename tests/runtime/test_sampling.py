"""The batched sampler: greedy, temperature, top-k, top-p, seeds, logprobs; parameter validation."""

import math

import pytest
import torch

from model_runtime.engine.requests import SamplingParams
from model_runtime.engine.sampling import SampleRow, make_generator, sample

pytestmark = pytest.mark.runtime


def row(temperature=1.0, top_p=1.0, top_k=0, seed=None, logprobs=None) -> SampleRow:
    g = make_generator(seed, "cpu") if seed is not None else None
    return SampleRow(temperature, top_p, top_k, g, logprobs)


def draws(logits: torch.Tensor, r: SampleRow, n: int, seed: int = 0) -> list[int]:
    """n independent draws: n copies of the row in one batch."""
    g = torch.Generator().manual_seed(seed)
    return sample(logits.expand(n, -1), [r] * n, g).token_ids


LOGITS = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, -3.0])


def test_greedy_picks_the_argmax_per_row_even_in_a_mixed_batch():
    logits = torch.randn(5, 50, generator=torch.Generator().manual_seed(1))
    rows = [row(0), row(1.0), row(0), row(0.7, top_k=5), row(0)]
    out = sample(logits, rows, torch.Generator().manual_seed(0)).token_ids
    for i in (0, 2, 4):
        assert out[i] == int(logits[i].argmax())


def test_temperature_sampling_follows_the_softmax():
    n = 3000
    for t in (0.5, 1.0, 2.0):
        counts = torch.bincount(torch.tensor(draws(LOGITS, row(t), n)), minlength=6).float() / n
        expected = torch.softmax(LOGITS / t, -1)
        assert torch.allclose(counts, expected, atol=0.03), (t, counts, expected)


def test_top_k_and_top_p_restrict_the_support():
    assert set(draws(LOGITS, row(5.0, top_k=2), 300)) == {0, 1}
    assert set(draws(LOGITS, row(1.0, top_k=1), 50)) == {0}
    probs = torch.softmax(LOGITS, -1)  # [0.57, 0.21, 0.13, ...]: 0.6 needs tokens 0 and 1
    assert set(draws(LOGITS, row(1.0, top_p=0.6), 400)) == {0, 1}
    assert set(draws(LOGITS, row(1.0, top_p=0.5), 100)) == {0}
    assert probs[0] < 0.6
    both = set(draws(LOGITS, row(1.0, top_k=3, top_p=0.9), 400))
    assert both == {0, 1, 2}


def test_a_seeded_row_samples_the_same_whatever_the_batch():
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(8, 100, generator=g)

    def run(batch_rows: list[int]) -> list[int]:
        seeded = row(1.0, seed=42)
        others = [row(1.0) for _ in batch_rows]
        picks = []
        for step in range(10):
            rows = others[:]
            rows.insert(0, seeded)
            x = (
                torch.cat([logits[step % 8][None], logits[batch_rows]])
                if batch_rows
                else logits[step % 8][None]
            )
            picks.append(
                sample(x, rows, torch.Generator().manual_seed(step + 100 * len(batch_rows))).token_ids[0]
            )
        return picks

    assert run([]) == run([1, 2, 3]) == run([4, 5, 6, 7, 0])


def test_logprobs_of_the_chosen_token_and_the_top_n():
    logits = torch.stack([LOGITS, LOGITS.flip(0)])
    out = sample(logits, [row(0, logprobs=3), row(0, logprobs=0)])
    ref = torch.log_softmax(LOGITS, -1)
    first, second = out.logprobs
    assert first["token_id"] == 0 and math.isclose(first["logprob"], float(ref[0]), abs_tol=1e-6)
    assert list(first["top"]) == [0, 1, 2]
    assert second["token_id"] == 5 and second["top"] == {}
    assert sample(logits, [row(0), row(0)]).logprobs == [None, None]


@pytest.mark.parametrize(
    ("params", "field"),
    [
        (SamplingParams(max_tokens=0), "max_tokens"),
        (SamplingParams(max_tokens=5000), "max_tokens"),
        (SamplingParams(temperature=float("nan")), "temperature"),
        (SamplingParams(top_p=1.5), "top_p"),
        (SamplingParams(top_k=2.5), "top_k"),
        (SamplingParams(seed="x"), "seed"),
        (SamplingParams(stop=[1]), "stop"),
        (SamplingParams(stop_token_ids=["a"]), "stop_token_ids"),
        (SamplingParams(logprobs=-1), "logprobs"),
        (SamplingParams(ignore_eos="yes"), "ignore_eos"),
    ],
)
def test_validate_names_the_bad_field(params, field):
    with pytest.raises(ValueError, match=f"^{field}"):
        params.validate(max_model_len=4096)


def test_valid_params_pass_and_a_single_stop_string_is_accepted():
    SamplingParams(temperature=0, top_k=-1, seed=1, stop="END", logprobs=5).validate(4096)
    assert SamplingParams(stop="END").stop == ["END"]
