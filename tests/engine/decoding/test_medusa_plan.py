"""Choosing the Medusa tree: presets and files, the acceptance profile, the device's measured
step time, and heads that score a token subset."""

import json

import pytest
import torch
from safetensors.torch import save_file

from engine.decoding.medusa import plan as medusa_plan
from engine.errors import EngineError
from engine.decoding.medusa.heads import MedusaHeads
from engine.decoding.medusa.heads import load_fasterdecoding
from engine.decoding.medusa.heads import Profile
from engine.decoding.medusa.plan import medusa_step, plan
from engine.decoding.medusa.proposer import MedusaProposer
from engine.decoding.speculative import step_costs as costs_table
from engine.decoding.speculative.step_costs import measure_step_ms
from engine.decoding.medusa.tree import CARD_CHOICES, build_tree
from engine.model.weights import from_dir

PROFILE = Profile([((0,), 0.6), ((0, 0), 0.4), ((1,), 0.1), ((0, 0, 0), 0.25), ((0, 1), 0.05), ((2,), 0.04)])


class FakeHeads:
    num_heads = 3

    def vocabulary(self, base_lm_head):
        return base_lm_head.out_features


def test_profile_trees_are_prefix_closed_and_expected_tokens_add_up():
    assert PROFILE.tree_paths(1, 3) == []
    assert PROFILE.tree_paths(3, 3) == [(0,), (0, 0)]
    assert PROFILE.tree_paths(4, 2) == [(0,), (0, 0), (1,)]  # depth 3 needs 3 heads
    assert PROFILE.expected_tokens(PROFILE.tree_paths(4, 3)) == pytest.approx(1 + 0.6 + 0.4 + 0.1)


def test_auto_picks_the_most_tokens_per_second(monkeypatch, tiny_checkpoint):
    model = from_dir(tiny_checkpoint)
    # a CPU-like cost: every node adds a good share of a step
    costs = {n: 10.0 + 3.0 * max(n - 1, 0) for n in range(65)}
    monkeypatch.setattr(medusa_plan, "step_costs", lambda *a: costs)
    p = plan(model, FakeHeads(), "tiny", None, PROFILE)
    rates = {n: PROFILE.expected_tokens(PROFILE.tree_paths(n, 3)) / costs[n] for n in (2, 3, 4, 5, 6, 7)}
    assert max(rates, key=rates.get) not in (2, 7)  # the case is not trivial
    best = max(rates, key=rates.get)
    assert p.tree.num_nodes == best and p.choices == f"auto ({best} nodes)"
    # rates within TIE of the best are a tie, won by the bigger tree
    tied = dict(costs)
    for n in (5, 6, 7):
        tied[n] = PROFILE.expected_tokens(PROFILE.tree_paths(n, 3)) / (rates[best] * (1 - medusa_plan.TIE / 2))
    monkeypatch.setattr(medusa_plan, "step_costs", lambda *a: tied)
    assert plan(model, FakeHeads(), "tiny", None, PROFILE).tree.num_nodes == 7
    tied[7] = PROFILE.expected_tokens(PROFILE.tree_paths(7, 3)) / (rates[best] * (1 - 2 * medusa_plan.TIE))
    assert plan(model, FakeHeads(), "tiny", None, PROFILE).tree.num_nodes == 6
    # a GPU-like cost: nodes are nearly free, so the whole profile goes in
    flat = {n: 10.0 + 0.01 * n for n in range(65)}
    monkeypatch.setattr(medusa_plan, "step_costs", lambda *a: flat)
    assert plan(model, FakeHeads(), "tiny", "auto", PROFILE).tree.num_nodes == 7


def test_presets_files_and_errors(tmp_path, tiny_checkpoint):
    model = from_dir(tiny_checkpoint)
    assert plan(model, FakeHeads(), "tiny", "card", PROFILE).tree.num_nodes == len(CARD_CHOICES) + 1
    assert plan(model, FakeHeads(), "tiny", None, None).choices == "card"  # no profile: the reference tree
    f = tmp_path / "tree.json"
    f.write_text(json.dumps([[0], [0, 0], [1]]))
    assert plan(model, FakeHeads(), "tiny", str(f), None).tree.num_nodes == 4
    with pytest.raises(EngineError, match="not a preset"):
        plan(model, FakeHeads(), "tiny", "bushy", None)
    f.write_text("{not json")
    with pytest.raises(EngineError, match="tree.json"):
        plan(model, FakeHeads(), "tiny", str(f), None)
    f.write_text(json.dumps([[0, 0, 0, 0]]))
    with pytest.raises(EngineError, match="4 deep"):
        plan(model, FakeHeads(), "tiny", str(f), None)


def test_heads_on_a_token_subset(tmp_path, tiny_checkpoint):
    """Shipped-style heads: FasterDecoding layout plus ``token_ids``; proposals come from the
    subset, scored with the base lm_head's rows, and the step time is measured for real."""
    model = from_dir(tiny_checkpoint)
    h = model.cfg.hidden_size
    ids = torch.tensor([3, 17, 250, 4000, 49151])
    g = torch.Generator().manual_seed(0)
    tensors = {"token_ids": ids}
    for k in range(2):
        tensors[f"{k}.0.linear.weight"] = torch.randn(h, h, generator=g) * 0.1
        tensors[f"{k}.0.linear.bias"] = torch.randn(h, generator=g) * 0.1
    save_file(tensors, str(tmp_path / "heads.safetensors"))
    heads = load_fasterdecoding(tmp_path / "heads.safetensors", h, model.cfg.vocab_size, "cpu", torch.float32)
    assert isinstance(heads, MedusaHeads) and heads.token_ids.tolist() == ids.tolist()
    x = torch.randn(h, generator=g)
    proposals = heads.propose(x, model, build_tree([[0], [1], [0, 0]], 2), 0)  # nodes: h0 #0, h0 #1, h1 #0
    w = model.embed[ids]
    for k, n in enumerate((2, 1)):
        y = x + torch.nn.functional.silu(x @ tensors[f"{k}.0.linear.weight"].t() + tensors[f"{k}.0.linear.bias"])
        want = ids[(y @ w.t()).topk(n).indices]
        got = proposals[:2] if k == 0 else proposals[2:]
        assert got.tolist() == want.tolist()
    costs = measure_step_ms(model, [2, 3], medusa_step(model, heads, Profile([((0,), 0.5), ((0, 0), 0.3)])),
                            heads.num_heads + 1, warmup=0, reps=1, context=8)
    assert set(costs) == {0, 2, 3} and all(ms > 0 for ms in costs.values())
    tensors["token_ids"] = torch.tensor([3, 49152])  # past the vocabulary
    save_file(tensors, str(tmp_path / "bad.safetensors"))
    with pytest.raises(EngineError, match="token_ids"):
        load_fasterdecoding(tmp_path / "bad.safetensors", h, model.cfg.vocab_size, "cpu", torch.float32)


def assert_medusa_equals_plain(model, heads, tree, ids=(1, 50, 60, 70), n=20):
    """Medusa greedy decoding with ``heads`` and ``tree`` gives the model's plain greedy tokens."""
    from engine.decoding.speculative.verify import prefill_and_generate

    with torch.inference_mode():
        got = [t for step in prefill_and_generate(model, MedusaProposer(model, heads, tree), model.new_cache(128), list(ids), n) for t in step]
        cache, want = model.new_cache(128), []
        logits = model.forward(torch.tensor([list(ids)]), cache, 0)
        for _ in range(n):
            want.append(int(logits[0, -1].argmax()))
            logits = model.forward(torch.tensor([[want[-1]]]), cache, cache.length)
    assert got == want


def write_heads(folder, model, g, num_heads, path):
    """Random root-conditioned heads (with path inputs when ``path``) written in chatapp's layout
    and loaded: (their tensors, MedusaHeads)."""
    h = model.cfg.hidden_size
    tensors = {}
    for k in range(num_heads):
        tensors[f"{k}.0.linear.weight"] = torch.randn(h, h, generator=g) * 0.1
        tensors[f"{k}.0.linear.bias"] = torch.randn(h, generator=g) * 0.1
        tensors[f"{k}.root.weight"] = torch.randn(h, h, generator=g) * 0.5
        for j in range(1, k + 1 if path else 1):
            tensors[f"{k}.path.{j}.weight"] = torch.randn(h, h, generator=g) * 0.5
    save_file(tensors, str(folder / "heads.safetensors"))
    return tensors, load_fasterdecoding(folder / "heads.safetensors", h, model.cfg.vocab_size, "cpu", torch.float32)


def test_heads_that_take_the_root_token(tmp_path, tiny_checkpoint):
    """chatapp's heads for the embedded model: head k's input is the hidden state plus
    ``{k}.root.weight`` times the root token's embedding; the proposals follow the root, and
    Medusa greedy output still equals plain greedy output. Root weights for only some heads
    are refused."""
    model = from_dir(tiny_checkpoint)
    h = model.cfg.hidden_size
    g = torch.Generator().manual_seed(1)
    tensors, heads = write_heads(tmp_path, model, g, 2, path=False)
    assert heads.root_proj is not None and len(heads.root_proj) == 2
    x = torch.randn(h, generator=g)
    for root in (5, 700):
        proposals = heads.propose(x, model, build_tree([[0], [1], [2], [0, 0], [0, 1]], 2), torch.tensor(root))
        for k, n in enumerate((3, 2)):
            z = x + model.embed[root] @ tensors[f"{k}.root.weight"].t()
            y = z + torch.nn.functional.silu(z @ tensors[f"{k}.0.linear.weight"].t() + tensors[f"{k}.0.linear.bias"])
            want = (y @ model.embed.t()).topk(n).indices
            got = proposals[:3] if k == 0 else proposals[3:]
            assert got.tolist() == want.tolist()
    assert_medusa_equals_plain(model, heads, build_tree([[0], [1], [0, 0], [2]], 2))
    del tensors["1.root.weight"]
    save_file(tensors, str(tmp_path / "half.safetensors"))
    with pytest.raises(EngineError, match="1.root.weight"):
        load_fasterdecoding(tmp_path / "half.safetensors", h, model.cfg.vocab_size, "cpu", torch.float32)


def test_heads_that_take_the_path(tmp_path, tiny_checkpoint):
    """Hydra-style heads: head k's input also gets ``{k}.path.{j}.weight`` times the embedding of
    the path's token at depth j; each parent node's children come from its own path (checked
    against a direct computation), Medusa greedy output equals plain greedy output, and path
    weights that are missing, extra or without root weights are refused."""
    model = from_dir(tiny_checkpoint)
    h, emb = model.cfg.hidden_size, model.embed
    g = torch.Generator().manual_seed(2)
    tensors, heads = write_heads(tmp_path, model, g, 3, path=True)
    assert [len(p) for p in heads.path_proj] == [0, 1, 2]

    def head(k, x, path):  # path: the root's token, then the tokens at depths 1..k
        z = x + emb[path[0]] @ tensors[f"{k}.root.weight"].t()
        for j in range(1, k + 1):
            z = z + emb[path[j]] @ tensors[f"{k}.path.{j}.weight"].t()
        y = z + torch.nn.functional.silu(z @ tensors[f"{k}.0.linear.weight"].t() + tensors[f"{k}.0.linear.bias"])
        return (y @ emb.t()).topk(3).indices.tolist()

    tree = build_tree([[0], [1], [2], [0, 0], [0, 1], [1, 0], [0, 0, 0], [0, 1, 1]], 3)
    x, root = torch.randn(h, generator=g), 9
    got = dict(zip(tree.paths, heads.propose(x, model, tree, torch.tensor(root)).tolist()))
    for path in tree.paths:
        tokens = [root] + [got[path[:d]] for d in range(1, len(path))]
        assert got[path] == head(len(path) - 1, x, tokens)[path[-1]], path
    assert got[(0, 0)] != got[(1, 0)] or got[(0,)] == got[(1,)]  # children follow their parent
    assert_medusa_equals_plain(model, heads, tree)
    for change, match in ((lambda t: t.pop("2.path.2.weight"), "2.path.2.weight"),
                          (lambda t: t.update({"0.path.1.weight": t["1.path.1.weight"].clone()}), "0.path.1.weight"),
                          (lambda t: [t.pop(f"{k}.root.weight") for k in range(3)], "root inputs")):
        bad = dict(tensors)
        change(bad)
        save_file(bad, str(tmp_path / "bad.safetensors"))
        with pytest.raises(EngineError, match=match):
            load_fasterdecoding(tmp_path / "bad.safetensors", h, model.cfg.vocab_size, "cpu", torch.float32)


def test_auto_falls_back_to_plain_where_no_tree_pays(monkeypatch, tiny_checkpoint):
    model = from_dir(tiny_checkpoint)
    costly = {n: 10.0 * (1 + 1.5 * min(n, 1)) + n for n in range(65)}  # any tree costs 2.5x a plain step
    monkeypatch.setattr(medusa_plan, "step_costs", lambda *a: costly)
    p = plan(model, FakeHeads(), "tiny", None, PROFILE)
    assert p.tree is None and p.choices.startswith("auto (plain")


def test_measured_tree_costs_are_made_non_decreasing_by_pooling():
    from engine.decoding.speculative.step_costs import non_decreasing

    assert non_decreasing([1.0, 2.0, 3.0]) == [1.0, 2.0, 3.0]
    assert non_decreasing([30.0, 40.0, 36.0, 50.0]) == [30.0, 38.0, 38.0, 50.0]
    assert non_decreasing([5.0, 4.0, 3.0]) == [4.0, 4.0, 4.0]
    got = non_decreasing([45.0, 51.0, 48.0, 48.0, 70.0, 66.0, 61.0, 76.0])
    assert all(a <= b for a, b in zip(got, got[1:])) and sum(got) == pytest.approx(465.0)


def test_a_profile_is_read_for_the_cache_the_tree_is_verified_over(tmp_path):
    """A heads file's profile over a DMC cache (training/medusa.py --profile-over dmc) is the one
    a tree over a DMC cache is planned from; without one, the training profile serves every cache."""
    path = tmp_path / "heads.json"
    trained = [{"path": [0], "freq": 0.5}, {"path": [0, 0], "freq": 0.3}]
    path.write_text(json.dumps({"profile": trained}))
    assert Profile.read(path, "dmc").paths == Profile.read(path).paths == [((0,), 0.5), ((0, 0), 0.3)]
    path.write_text(json.dumps({"profile": trained, "profiles": {"dmc": {"profile": [
        {"path": [0], "freq": 0.4}, {"path": [1], "freq": 0.2}]}}}))
    assert Profile.read(path, "dmc").paths == [((0,), 0.4), ((1,), 0.2)]
    assert Profile.read(path, "plain").paths == [((0,), 0.5), ((0, 0), 0.3)]
    path.write_text(json.dumps({"profile": trained, "profiles": {"dmc": [1, 2]}}))
    with pytest.raises(EngineError, match="not a Medusa acceptance profile"):
        Profile.read(path, "dmc")


def test_a_stored_step_table_from_a_busier_machine_is_measured_again(monkeypatch, tmp_path, tiny_checkpoint):
    monkeypatch.setenv("CHATAPP_CACHE_DIR", str(tmp_path))
    model = from_dir(tiny_checkpoint)
    assert costs_table.quick_plain_ms(model) > 0
    measured = []
    monkeypatch.setattr(costs_table, "quick_plain_ms", lambda *a: 10.0)  # the machine as it is now
    monkeypatch.setattr(costs_table, "measure_step_ms", lambda *a, **k: measured.append(1) or {0: 10.0, 2: 11.0, 3: 12.0})
    first = costs_table.step_costs(model, "tiny", [2, 3])
    assert costs_table.step_costs(model, "tiny", [2, 3]) == first  # read back, not measured
    assert len(measured) == 1
    file = tmp_path / "medusa_step_ms.json"
    table = json.loads(file.read_text())
    (key,) = table
    table[key] = {n: ms * 1.8 for n, ms in table[key].items()}  # a little busier when stored: kept
    file.write_text(json.dumps(table))
    costs_table.step_costs(model, "tiny", [2, 3])
    assert len(measured) == 1
    table[key] = {n: ms * 30 for n, ms in table[key].items()}  # stored while another process held the cores
    file.write_text(json.dumps(table))
    assert costs_table.step_costs(model, "tiny", [2, 3]) == first
    assert len(measured) == 2 and json.loads(file.read_text())[key]["0"] == 10.0
