"""Medusa over a DMC cache on the embedded model (its shipped heads and shipped DMC retrofit):
greedy Medusa+DMC output is token-identical to greedy DMC output, with several tokens per step
and the same KV compression."""

import json
from pathlib import Path

import pytest
import torch

from engine.events import LoadModel, SamplingParams
from engine.session import Session

PROMPTS = (Path(__file__).resolve().parents[3] / "bench" / "data" / "chat_prompts.txt").read_text().splitlines()


@pytest.fixture(scope="module")
def sessions(tmp_path_factory):
    dmc = Session.load(LoadModel(device="cpu", decoding="dmc"))
    # a fixed tree (the plan's choice depends on this machine's timings): the DMC profile's 6 nodes
    tree = tmp_path_factory.mktemp("tree") / "tree.json"
    tree.write_text(json.dumps([[0], [0, 0], [1], [0, 0, 0], [2]]))
    both = Session.load(LoadModel(device="cpu", decoding="dmc,medusa", medusa_choices=str(tree)))  # any spelling
    yield dmc, both
    dmc.close()
    both.close()


def test_greedy_medusa_over_dmc_equals_greedy_dmc(sessions):
    dmc, both = sessions
    assert both.decoding == "medusa+dmc" and both.info().decoding == "medusa+dmc"
    params = SamplingParams(max_new_tokens=32)
    tokens = steps = 0
    for prompt in PROMPTS[:8]:
        chat = [{"role": "user", "content": prompt}]
        dmc.reset()
        both.reset()
        want = list(dmc.generate(chat, params))[-1].stats
        got = list(both.generate(chat, params))[-1].stats
        assert got.token_ids == want.token_ids, prompt
        # the same merges; the caches hold what was yielded (DMC alone never steps the last token
        # of a reply cut at the token limit)
        a, b = dmc.decoder.dmc, both.decoder.base.dmc
        if b.length == a.length + 1:
            a.step(torch.tensor([want.token_ids[-1]]))
        assert a.length == b.length == len(both.decoder.cached_ids), prompt
        assert torch.equal(a.cache.lens, b.cache.lens), prompt
        tokens, steps = tokens + got.n_generated, steps + got.steps
    assert tokens / steps > 1.5


def test_a_second_turn_continues_the_dmc_cache(sessions):
    dmc, both = sessions
    params = SamplingParams(max_new_tokens=16)
    chat = [{"role": "user", "content": PROMPTS[1]}]
    for s in sessions:
        s.reset()
    first = [list(s.generate(chat, params))[-1].stats for s in sessions]
    assert first[0].token_ids == first[1].token_ids
    chat += [{"role": "assistant", "content": first[0].text}, {"role": "user", "content": "And one more?"}]
    second = [list(s.generate(chat, params))[-1].stats for s in sessions]
    assert second[0].token_ids == second[1].token_ids


def test_sampling_over_dmc_repeats_with_a_seed(sessions):
    _, both = sessions
    params = SamplingParams(max_new_tokens=16, temperature=0.8, seed=11)
    chat = [{"role": "user", "content": PROMPTS[2]}]
    runs = []
    for _ in range(2):
        both.reset()
        runs.append(list(both.generate(chat, params))[-1].stats.token_ids)
    assert runs[0] == runs[1] and len(runs[0]) > 0
