"""Sampling: filters against transformers' logits processors, seeded reproducibility."""

import pytest
import torch
from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

from engine.errors import EngineError
from engine.events import SamplingParams
from engine.decoding.sampling import Sampler, filtered_probs


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 0, 0.9), (0.7, 50, 1.0), (1.3, 20, 0.5), (0.5, 0, 0.05)])
def test_filters_match_transformers(temperature, top_k, top_p):
    logits = torch.randn(1, 1000, generator=torch.Generator().manual_seed(3)) * 3
    ref = TemperatureLogitsWarper(temperature)(None, logits.clone())
    if top_k:
        ref = TopKLogitsWarper(top_k)(None, ref)
    if top_p < 1:
        ref = TopPLogitsWarper(top_p)(None, ref)
    ours = filtered_probs(logits[0], SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p))
    torch.testing.assert_close(ours, ref.softmax(-1)[0])


def test_seeded_sampling_is_reproducible(embedded_session):
    msgs = [{"role": "user", "content": "Tell me a story about a dragon."}]

    def run(seed):
        p = SamplingParams(max_new_tokens=24, temperature=1.0, top_p=0.95, seed=seed, ignore_eos=True)
        return list(embedded_session.generate(msgs, p))[-1].stats.token_ids

    a, b, c = run(1234), run(1234), run(99)
    assert a == b
    assert a != c


def test_sampler_draws_follow_the_distribution():
    probs = torch.tensor([0.5, 0.3, 0.2, 0.0])
    sampler = Sampler(SamplingParams(temperature=1.0, seed=0), torch.device("cpu"))
    draws = torch.tensor([sampler(probs.log()) for _ in range(4000)])
    freq = torch.bincount(draws, minlength=4).float() / len(draws)
    torch.testing.assert_close(freq, probs, atol=0.03, rtol=0)


@pytest.mark.parametrize("params,field", [(SamplingParams(temperature=-1), "temperature"),
                                          (SamplingParams(top_p=0), "top_p"),
                                          (SamplingParams(top_k=-2), "top_k"),
                                          (SamplingParams(max_new_tokens=0), "max_new_tokens")])
def test_bad_settings_are_named(params, field):
    with pytest.raises(EngineError, match=field):
        Sampler(params, torch.device("cpu"))


@pytest.mark.parametrize("change, message", [
    ({"temperature": float("nan")}, "temperature must be >= 0, got nan"),
    ({"temperature": float("inf")}, "temperature must be >= 0, got inf"),
    ({"seed": 2**64}, "seed must be in [0, 2**63), got 18446744073709551616"),
    ({"seed": -1}, "seed must be in [0, 2**63)"),
])
def test_out_of_range_settings_are_one_line_errors(change, message):
    with pytest.raises(EngineError) as info:
        Sampler(SamplingParams(**change), torch.device("cpu"))
    assert message in str(info.value)
