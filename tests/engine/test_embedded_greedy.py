"""Greedy decoding of the embedded model: token-identical to transformers' greedy generate."""

import pytest
import torch

from engine.events import SamplingParams

PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain what a prime number is.",
    "Translate 'good morning' into Spanish.",
]
N = 48


@pytest.mark.parametrize("prompt", PROMPTS)
def test_greedy_matches_transformers_generate(embedded_session, hf_reference, prompt):
    messages = [{"role": "user", "content": prompt}]
    ids = embedded_session.tokenizer.encode_chat(messages)
    with torch.inference_mode():
        ref = hf_reference.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                    max_new_tokens=N, do_sample=False, pad_token_id=0)
    expected = ref[0, len(ids):].tolist()
    expected = expected[:-1] if expected[-1] in embedded_session.tokenizer.eos_ids else expected
    done = list(embedded_session.generate(messages, SamplingParams(max_new_tokens=N)))[-1]
    assert done.stats.token_ids == expected
    assert done.stats.text == embedded_session.tokenizer.decode(expected)


def test_answers_paris(embedded_session):
    done = list(embedded_session.generate([{"role": "user", "content": "What is the capital of France?"}],
                                          SamplingParams()))[-1]
    assert done.reason == "eos"
    assert "Paris" in done.stats.text


def test_follow_up_turn_reuses_the_cache_and_matches_a_fresh_run(embedded_session):
    """A second turn reuses the first turn's KV entries; the reply equals a run from scratch."""
    s = embedded_session
    first = [{"role": "user", "content": "Name a fruit."}]
    reply = list(s.generate(first, SamplingParams(max_new_tokens=16)))[-1].stats.text
    convo = first + [{"role": "assistant", "content": reply}, {"role": "user", "content": "And a vegetable?"}]
    prompt = s.tokenizer.encode_chat(convo)
    cached_before = list(s.decoder.cached_ids)
    shared = next(i for i, (a, b) in enumerate(zip(cached_before + [None], prompt)) if a != b)
    assert shared > 20  # the first turn is reused
    warm = list(s.generate(convo, SamplingParams(max_new_tokens=16)))[-1].stats.token_ids
    s.reset()
    cold = list(s.generate(convo, SamplingParams(max_new_tokens=16)))[-1].stats.token_ids
    assert warm == cold


def test_prompt_longer_than_context_is_a_clear_error(embedded_session):
    from engine.errors import EngineError

    with pytest.raises(EngineError, match=r"prompt has \d+ tokens, more than the context of \d+ tokens"):
        list(embedded_session.generate([{"role": "user", "content": "word " * 9000}]))


def test_recommended_sampling_comes_from_generation_config(tiny_checkpoint):
    import json

    from engine.events import LoadModel
    from engine.session import Session

    gen = tiny_checkpoint / "generation_config.json"
    gen.write_text(json.dumps({**json.loads(gen.read_text()), "do_sample": True, "temperature": 0.6, "top_p": 0.9}))
    session = Session.load(LoadModel(model=str(tiny_checkpoint), device="cpu"))
    p = session.recommended_params()
    assert (p.temperature, p.top_p, p.top_k) == (0.6, 0.9, 0)
    gen.write_text(json.dumps({"eos_token_id": 2}))
    assert Session.load(LoadModel(model=str(tiny_checkpoint), device="cpu")).recommended_params().temperature == 0


def test_stops_on_any_of_several_eos_ids(tiny_checkpoint):
    """Llama 3.1 lists three EOS ids in generation_config.json; any of them ends the reply."""
    import json

    from engine.events import LoadModel
    from engine.session import Session

    msgs = [{"role": "user", "content": "hi"}]
    free = list(Session.load(LoadModel(model=str(tiny_checkpoint), device="cpu")).generate(
        msgs, SamplingParams(max_new_tokens=12, ignore_eos=True)))[-1].stats.token_ids
    stop = free[6]
    (tiny_checkpoint / "generation_config.json").write_text(json.dumps({"eos_token_id": [49000, stop, 49001]}))
    session = Session.load(LoadModel(model=str(tiny_checkpoint), device="cpu"))
    assert {49000, stop, 49001} <= session.tokenizer.eos_ids
    done = list(session.generate(msgs, SamplingParams(max_new_tokens=12)))[-1]
    assert done.reason == "eos"
    assert done.stats.token_ids == free[: free.index(stop)]
