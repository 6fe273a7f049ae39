"""Medusa decoding: greedy output identical to plain greedy decoding, with real acceptances."""

import pytest
import torch

from engine.events import SamplingParams
from engine.model.linear import Linear
from engine.decoding.medusa.heads import MedusaHeads
from engine.decoding.medusa.proposer import MedusaProposer
from engine.decoding.speculative.verify import TypicalAcceptance, accepted_lengths, prefill_and_generate
from engine.decoding.medusa.tree import CARD_CHOICES, build_tree


def identity_heads(model, num_heads=3):
    """ResBlocks with zero weights and bias (x + SiLU(0) = x) on the shared lm_head: every head
    proposes the base model's own next token again. Real proposals, so acceptances happen on
    repetitive text, and verification and KV compaction run with every accepted length."""
    h = model.cfg.hidden_size
    zero = Linear(torch.zeros(h, h), torch.zeros(h), splits=1)
    return MedusaHeads([[zero] for _ in range(num_heads)], None)


def random_heads(model, num_heads=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = model.cfg.hidden_size
    blocks = [[Linear(torch.randn(h, h, generator=g) * 0.02, torch.randn(h, generator=g) * 0.02)]
              for _ in range(num_heads)]
    return MedusaHeads(blocks, None)


@pytest.mark.parametrize("prompt,heads", [
    ("Give me three tips for learning to cook.", identity_heads),  # greedy output repeats "1" for a long run
    ("Write a haiku about the sea.", identity_heads),
    ("Explain what a prime number is.", random_heads),
])
def test_medusa_greedy_equals_plain_greedy(embedded_session, prompt, heads):
    s = embedded_session
    messages = [{"role": "user", "content": prompt}]
    n = 40
    s.reset()
    plain = list(s.generate(messages, SamplingParams(max_new_tokens=n)))[-1].stats.token_ids
    ids = s.tokenizer.encode_chat(messages)
    model = s.model
    tree = build_tree(CARD_CHOICES, num_heads=3)
    cache = model.new_cache(512)
    steps = list(prefill_and_generate(model, MedusaProposer(model, heads(model), tree), cache, ids, n, s.tokenizer.eos_ids))
    tokens = [t for step in steps for t in step]
    assert tokens == plain
    if prompt.startswith("Give me"):
        assert max(len(step) for step in steps) >= 3  # several tokens accepted in one step
        assert len(steps) < len(tokens)


def test_compaction_leaves_the_cache_as_plain_decoding_would(embedded_session):
    """After Medusa steps, the KV cache holds exactly what sequential decoding writes."""
    s = embedded_session
    model = s.model
    ids = s.tokenizer.encode_chat([{"role": "user", "content": "Give me three tips for learning to cook."}])
    tree = build_tree(CARD_CHOICES, num_heads=3)
    cache = model.new_cache(512)
    tokens = [t for step in prefill_and_generate(model, MedusaProposer(model, identity_heads(model), tree), cache, ids, 24) for t in step]
    # every accepted token is in the cache (a last step cut at max_new_tokens may hold a few more)
    n = len(ids) + len(tokens)
    assert cache.length >= n
    ref = model.new_cache(512)
    model.forward(torch.tensor([ids + tokens]), ref, 0)
    torch.testing.assert_close(cache.k[:, :, :, :n], ref.k[:, :, :, :n], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(cache.v[:, :, :, :n], ref.v[:, :, :, :n], atol=1e-4, rtol=1e-4)


def test_typical_acceptance_rule():
    v = 8
    logits = torch.full((2, v), -10.0)
    logits[:, 1] = 10.0  # the base model is sure: token 1 after every inner node
    parent = torch.tensor([0, 1, 1])
    tokens = torch.tensor([1, 1, 2])  # the child of row 0 proposes 1, the children of row 1 propose 1 and 2
    acc = TypicalAcceptance(temperature=1.0)
    assert acc(logits, parent, tokens).tolist() == [True, True, False]
    # a flat distribution (high entropy) lowers the bar: alpha * exp(-H) = 0.3 / 8 < 1 / 8
    assert acc(torch.zeros(2, v), parent, tokens).tolist() == [True, True, True]


def test_accepted_lengths_follow_the_paths():
    tree = build_tree([[0], [1], [0, 0], [0, 1]], num_heads=2)  # nodes: 1=(0) 2=(1) 3=(0,0) 4=(0,1)
    assert tree.retrieve_rows == [[0, 2], [0, 1, 3], [0, 1, 4]]
    ok = torch.tensor([True, False, False, True])  # (0) and (0,1) right
    assert accepted_lengths(ok, tree).tolist() == [0, 1, 2]
    ok = torch.tensor([False, True, True, True])  # a right child of a wrong parent does not count
    assert accepted_lengths(ok, tree).tolist() == [1, 0, 0]


def test_typical_sampling_is_seeded_and_accepts(embedded_session):
    from engine.decoding.sampling import Sampler

    s = embedded_session
    model = s.model
    ids = s.tokenizer.encode_chat([{"role": "user", "content": "Give me three tips for learning to cook."}])
    tree = build_tree(CARD_CHOICES, num_heads=3)

    def run(seed):
        sampler = Sampler(SamplingParams(temperature=0.7, seed=seed), model.device)
        steps = list(prefill_and_generate(model, MedusaProposer(model, identity_heads(model), tree), model.new_cache(512), ids, 30,
                              sampler=sampler, accept=TypicalAcceptance(temperature=0.7)))
        return steps

    a, b = run(5), run(5)
    assert a == b
    tokens = [t for step in a for t in step]
    assert len(tokens) == 30 and max(len(step) for step in a) >= 2


def test_static_tree_step_equals_the_tree_forward(embedded_session):
    """The static-shape verify pass (what a CUDA graph captures) gives the same hidden states
    and cache entries as the dynamic one."""
    model = embedded_session.model
    ids = embedded_session.tokenizer.encode_chat([{"role": "user", "content": "Name a colour."}])
    tree = build_tree(CARD_CHOICES[:12], num_heads=3)
    nodes = torch.randint(0, 1000, (1, tree.num_nodes), generator=torch.Generator().manual_seed(0))
    a, b = model.new_cache(128), model.new_cache(128)
    with torch.inference_mode():
        for c in (a, b):
            model.forward(torch.tensor([ids]), c, 0)
        want = model.tree_hidden(nodes, a, len(ids), tree.position_offsets, tree.attn_mask)[0]
        got = model.tree_step(nodes, torch.tensor(len(ids)), b, tree.position_offsets, tree.attn_mask)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    end = len(ids) + tree.num_nodes
    torch.testing.assert_close(b.k[:, :, :, :end], a.k[:, :, :, :end], atol=1e-4, rtol=1e-4)
