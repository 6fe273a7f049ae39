"""Lookup decoding (drafts from earlier in the conversation): the n-gram index, the draft-length
choice, and greedy output identical to plain greedy output on a checkpoint without heads, on the
embedded model alone and beside its Medusa heads, with drafts accepted where the reply quotes the
prompt."""

import json

import pytest

from engine.decoding.lookup.index import NgramIndex
from engine.decoding.lookup.proposer import Acceptance, LookupProposer, cost_sizes, interpolate, trie_size
from engine.decoding.speculative.counters import Counters
from engine.decoding.base import Accepted
from engine.events import LoadModel, SamplingParams
from engine.session import Session

TEXT = ("The quick brown fox jumps over the lazy dog. A stitch in time saves nine. All that glitters is not "
        "gold; fortune favours the bold, and every cloud has a silver lining.")
QUOTING = [f"Repeat this text exactly, word for word:\n\n{TEXT}",
           f"Fix the typo in this sentence and write it out again: {TEXT.replace('quick', 'quikc')}",
           "Here is some code:\n\ndef add(a, b):\n    return a + b\n\ndef sub(a, b):\n    return a - b\n\n"
           "Rename add to plus and write the code out again."]
ORDINARY = ["What is the capital of France?", "Give me three tips for sleeping better."]


def test_the_index_finds_the_longest_earlier_match_most_recent_first():
    idx = NgramIndex(2, 4)
    idx.sync([1, 2, 3, 4, 9, 1, 2, 3, 5, 7])
    assert idx.continuations([1, 2, 3], 3, 2) == (3, [[5, 7], [4, 9, 1]])  # the most recent first
    assert idx.continuations([8, 3], 2, 3) == (0, [])  # (8, 3) never occurred; one token is not a match
    assert idx.continuations([9, 1], 2, 3) == (2, [[2, 3]])
    idx.sync([1, 2, 3, 4, 9, 1, 2, 3, 5, 7, 6])  # a continuation: only the new token is indexed
    assert idx.continuations([5, 7], 5, 1) == (2, [[6]])
    idx.sync([4, 4, 4])  # another conversation: indexed afresh
    assert idx.tokens == [4, 4, 4] and idx.continuations([1, 2], 2, 1) == (0, [])


def test_the_draft_length_follows_acceptance_and_cost():
    cpu = {1: 10.0, **{n: 10.0 + 1.5 * (n - 1) for n in range(2, 32)}}  # each node a good share of a step
    lookup = LookupProposer("cpu", cpu)
    assert lookup.draft_length(0.05) == 0  # rarely right: a one-token step is faster
    assert 0 < lookup.draft_length(0.6) < lookup.draft_length(0.95) <= 10
    flat = {n: 10.0 for n in range(1, 32)}  # a GPU: nodes are nearly free
    assert LookupProposer("cpu", flat).draft_length(0.3) == 10
    acc = Acceptance()
    assert acc.p(3) == 0.5
    acc.record(3, 4, 4)  # all accepted: no rejection
    acc.record(3, 0, 4)
    assert acc.p(3) == pytest.approx(5 / 7)
    assert interpolate({0: 1.0, 1: 10.0, 5: 14.0}, 3) == 12.0 and interpolate({1: 10.0, 5: 14.0}, 7) == 16.0
    assert trie_size([[1, 2, 3], [1, 2, 4], [5]]) == 6
    assert cost_sizes(1)[0] == 1 and cost_sizes(1)[-1] == 31 and cost_sizes(62)[-1] == 72


def test_counters_in_the_fields_terms():
    c = Counters()
    c.add([5])
    c.add(Accepted([1, 2, 3], ["", "lookup", "medusa+lookup"], draft_nodes=6, draft_depth=4))
    d = c.to_dict()
    assert (d["drafts"], d["draft_tokens"], d["accepted_tokens"], d["tokens"]) == (1, 6, 2, 4)
    assert d["acceptance_by_position"] == [1.0, 1.0, 0.0, 0.0] and d["by_proposer"] == {"lookup": 2, "medusa": 1}
    assert d["draft_share"] == 0.5
    assert d["accepted_histogram"] == [0, 0, 1, 0, 0]  # one draft of depth 4, two of its tokens accepted
    assert Counters.from_dict(d) == c
    v = c.vllm_request_metrics()["speculative_decoding"]
    assert (v["num_spec_steps"], v["num_draft_tokens"], v["num_accepted_draft_tokens"], v["num_spec_tokens"]) == \
        (1, 6, 2, 4)
    assert v["mean_acceptance_length"] == 3.0 and v["draft_acceptance_rate"] == pytest.approx(2 / 6)


def _greedy(session, prompts, n=48):
    out = []
    for prompt in prompts:
        session.reset()
        out.append(list(session.generate([{"role": "user", "content": prompt}], SamplingParams(max_new_tokens=n)))[-1]
                   .stats)
    return out


def test_a_checkpoint_without_heads_decodes_with_lookup(tiny_checkpoint):
    plain = Session.load(LoadModel(str(tiny_checkpoint), "cpu", decoding="plain"))
    lookup = Session.load(LoadModel(str(tiny_checkpoint), "cpu", decoding="lookup"))
    assert lookup.decoding == "lookup" and lookup.info().decoding == "lookup"
    want, got = _greedy(plain, QUOTING + ORDINARY, 40), _greedy(lookup, QUOTING + ORDINARY, 40)
    assert [s.token_ids for s in got] == [s.token_ids for s in want]
    assert sum(s.n_generated for s in got) > sum(s.steps for s in got)  # drafts were accepted (a random model loops)


@pytest.fixture(scope="module")
def embedded(tmp_path_factory):
    tree = tmp_path_factory.mktemp("tree") / "tree.json"  # fixed (the plan's choice depends on timings)
    tree.write_text(json.dumps([[0], [0, 0], [1], [0, 0, 0], [2]]))
    sessions = {d: Session.load(LoadModel(device="cpu", decoding=d, medusa_choices=str(tree)))
                for d in ("plain", "lookup", "medusa", "lookup,medusa")}
    yield sessions
    for s in sessions.values():
        s.close()


def test_greedy_lookup_and_medusa_lookup_equal_plain_greedy_on_the_embedded_model(embedded):
    assert embedded["lookup,medusa"].decoding == "medusa+lookup"
    runs = {s.decoding: _greedy(s, QUOTING + ORDINARY) for s in embedded.values()}
    for d, stats in runs.items():
        assert [s.token_ids for s in stats] == [s.token_ids for s in runs["plain"]], d
    quoted = {d: sum(s.n_generated for s in stats[:len(QUOTING)]) / sum(s.steps for s in stats[:len(QUOTING)])
              for d, stats in runs.items()}
    assert quoted["lookup"] > 2.0  # the reply quotes the prompt: whole runs of it accepted per step
    assert quoted["medusa+lookup"] >= quoted["medusa"]
    spec = runs["medusa+lookup"][0].speculation
    assert spec["by_proposer"].get("lookup", 0) > 0 and spec["accepted_tokens"] <= spec["draft_tokens"]


def test_accepted_drafts_are_marked_in_the_token_events(embedded):
    s = embedded["lookup"]
    s.reset()
    events = list(s.generate([{"role": "user", "content": QUOTING[0]}], SamplingParams(max_new_tokens=32)))
    tokens = [e for e in events if hasattr(e, "drafted_chars")]
    assert any(t.drafted_chars > 0 for t in tokens)
    for t in tokens:
        assert len(t.drafted_by) == len(t.token_ids) and t.drafted_by[0] == ""
        assert t.drafted_chars <= len(t.text) and (t.drafted_chars > 0) == any(t.drafted_by[1:]) or not t.text
