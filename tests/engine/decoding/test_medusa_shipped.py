"""The Medusa heads shipped for the embedded model: greedy Medusa output is token-identical to
plain greedy output (fp32, CPU) on ordinary chat prompts, with real multi-token acceptance."""

from pathlib import Path

import pytest

from engine.events import LoadModel, SamplingParams
from engine.decoding.medusa.heads import shipped_heads
from engine.decoding.medusa.plan import Plan
from engine.decoding.medusa.proposer import MedusaProposer
from engine.decoding.speculative.decoder import SpeculativeDecoder
from engine.decoding.plain import PlainDecoder
from engine.decoding.medusa.tree import CARD_CHOICES, build_tree
from engine.session import Session

PROMPTS = (Path(__file__).resolve().parents[3] / "bench" / "data" / "chat_prompts.txt").read_text().splitlines()


@pytest.fixture(scope="module")
def shipped(embedded_session):
    heads, profile = shipped_heads(embedded_session.name, embedded_session.model.cfg, "cpu",
                                   embedded_session.model.dtype)
    assert heads is not None and profile is not None, "assets/medusa has no heads for the embedded model"
    assert heads.root_proj is not None and heads.path_proj is not None
    return heads, profile


def test_greedy_medusa_equals_plain_greedy_on_chat_prompts(embedded_session, shipped):
    heads, profile = shipped
    plain = embedded_session
    tree = build_tree(profile.tree_paths(8, heads.num_heads), heads.num_heads)
    medusa = Session(plain.name, plain.path, plain.model, plain.tokenizer,
                     SpeculativeDecoder(PlainDecoder(plain.model, 1024), MedusaProposer(plain.model, heads, tree), "medusa"))
    params = SamplingParams(max_new_tokens=32)
    tokens = steps = 0
    assert len(PROMPTS) >= 20
    for prompt in PROMPTS:
        messages = [{"role": "user", "content": prompt}]
        plain.reset()
        want = list(plain.generate(messages, params))[-1].stats
        got = list(medusa.generate(messages, params))[-1].stats
        assert got.token_ids == want.token_ids, prompt
        assert sum(got.accepted_per_step) == got.n_generated and got.decoding == "medusa"
        tokens, steps = tokens + got.n_generated, steps + got.steps
    # the heads really predict the model's own continuation (bench/medusa_decode.py: 1.94 per step)
    assert tokens / steps > 1.6


def test_card_tree_and_a_second_turn_reuse_the_cache(embedded_session, shipped):
    heads, _ = shipped
    plain = embedded_session
    medusa = Session(plain.name, plain.path, plain.model, plain.tokenizer,
                     SpeculativeDecoder(PlainDecoder(plain.model, 1024), MedusaProposer(plain.model, heads, build_tree(CARD_CHOICES, 3)), "medusa", Plan(None, "card")))
    params = SamplingParams(max_new_tokens=24)
    chat = [{"role": "user", "content": PROMPTS[0]}]
    first = list(medusa.generate(chat, params))[-1].stats
    chat += [{"role": "assistant", "content": first.text}, {"role": "user", "content": PROMPTS[1]}]
    second = list(medusa.generate(chat, params))[-1].stats
    plain.reset()
    assert list(plain.generate(chat, params))[-1].stats.token_ids == second.token_ids


def test_run_with_shipped_heads(embedded_session):
    """`--decoding medusa` on the embedded model loads the shipped heads (tree from a file here,
    so that the test does not time the device)."""
    s = Session.load(LoadModel(None, "cpu", 512, decoding="medusa", medusa_choices="card"))
    assert s.decoding == "medusa" and s.info().medusa_tree == "card"
    done = list(s.generate([{"role": "user", "content": "What is the capital of France?"}],
                           SamplingParams(max_new_tokens=16)))[-1]
    assert "Paris" in done.stats.text and done.stats.medusa_tree == "card"
