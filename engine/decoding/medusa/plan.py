"""Which Medusa tree to verify on this device.

A tree of N nodes yields, per step, 1 + the sum over its proposal nodes of the frequency with
which that node's path of ranks is entirely right (the heads' acceptance profile, measured on
held-out replies when the heads were trained: the matching nodes form one chain). It costs one
verify step, whose time depends on N and on the device: on a GPU 64 nodes cost about what one
does, on a CPU each node adds a sizeable share of a step. So the best tree is the one with the
most expected tokens per second of measured step time (of the trees within TIE of the most, the
biggest: the timing cannot order them, while the bigger tree's extra tokens per step are no
noise), and it differs per device. Where no tree beats a plain decoding step (a CPU on which a
two-token pass costs much more than a one-token one, with weak heads), the plan is plain
decoding.

``--medusa-choices`` overrides the choice: a preset (``auto``, ``card``) or a JSON file with a
list of paths."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from engine.errors import EngineError
from engine.decoding.medusa.heads import Profile
from engine.decoding.medusa.tree import CARD_CHOICES, MedusaTree, build_tree
from engine.decoding.speculative.step_costs import step_costs
from engine.decoding.speculative.verify import DenseTarget, TreeGraph, verify

PRESETS = ("auto", "card")
TREE_SIZES = (1, 2, 3, 4, 5, 6, 8, 10, 12, 16, 24, 32, 48, 64)
# expected tokens/s this close to the best's are a tie, which the bigger tree wins: on a 2-core CPU the
# small trees' rates (relative to a one-token step) moved by up to 10 % between four measurements
# in a row, and their order with them, while each tree's tokens per step are fixed by the profile
TIE = 0.03


@dataclass
class Plan:
    tree: MedusaTree | None  # None: no tree is faster than plain decoding on this device
    choices: str  # how it was chosen, for the model info
    expected_tokens_per_step: float | None = None
    step_ms: float | None = None
    plain_step_ms: float | None = None


def read_choices(spec: str, num_heads: int) -> list[list[int]]:
    """A preset's or a JSON file's paths."""
    if spec == "card":
        return [c for c in CARD_CHOICES if len(c) <= num_heads]
    path = Path(spec).expanduser()
    if not path.is_file():
        raise EngineError(f"--medusa-choices {spec!r}: not a preset ({', '.join(PRESETS)}) and not a file")
    try:
        choices = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise EngineError(f"{path}: not a JSON list of Medusa choices ({e})") from None
    if not isinstance(choices, list):
        raise EngineError(f"{path}: expected a JSON list of paths such as [[0], [0, 0], [1]]")
    return choices


def medusa_step(model, heads, profile: Profile | None):
    """``tree_step`` for step_costs: a verify step of the heads' best tree of ``n`` nodes (or
    the card's first ``n``), the heads' proposing included, as decoding runs it."""
    hidden = torch.zeros(model.cfg.hidden_size, device=model.device, dtype=model.dtype)

    def tree_step(n: int, target):
        paths = profile.tree_paths(n, heads.num_heads) if profile else CARD_CHOICES[:n - 1]
        tree = build_tree(paths or [[0]], heads.num_heads).to(model.device)
        graph = TreeGraph.for_device(model, tree, target.cache) if isinstance(target, DenseTarget) else None
        return lambda: verify(model, tree, target, 0, heads.propose(hidden, model, tree, 0), graph=graph).keep(target)

    return tree_step


def plan(model, heads, name: str, choices: str | None, profile: Profile | None, dmc: dict | None = None) -> Plan:
    """The tree to verify: the user's choice, or (``auto``) the best for this device and cache
    (``dmc``: the DMC settings when the tree is verified over a DMC cache)."""
    choices = choices or "auto"
    if choices != "auto":
        tree = build_tree(read_choices(choices, heads.num_heads), heads.num_heads)
        ranks = heads.vocabulary(model.lm_head)
        if max(tree.topk) > ranks:
            raise EngineError(f"--medusa-choices {choices}: a path ranks token {max(tree.topk) - 1}, but the heads "
                              f"score {ranks} tokens")
        return Plan(tree.to(model.device), choices)
    if profile is None:  # no acceptance figures for these heads: the reference tree
        return Plan(build_tree(read_choices("card", heads.num_heads), heads.num_heads).to(model.device), "card")
    most = len([p for p, _ in profile.paths if len(p) <= heads.num_heads]) + 1
    sizes = sorted({n for n in TREE_SIZES if 2 <= n < most} | {most})
    costs = step_costs(model, name, sizes, medusa_step(model, heads, profile), heads.num_heads + 1, dmc)

    def rate(n):
        return profile.expected_tokens(profile.tree_paths(n, heads.num_heads)) / costs[n]

    best = max(sizes, key=rate)
    if rate(best) <= 1.0 / costs[0]:
        return Plan(None, f"auto (plain: no tree beats plain decoding here; best {best} nodes, "
                          f"{rate(best) * costs[0]:.2f}x)", 1.0, costs[0], costs[0])
    tie = max((1 - TIE) * rate(best), 1.0 / costs[0])
    best = max(n for n in sizes if rate(n) >= tie)  # of the ties, the most tokens per step
    paths = profile.tree_paths(best, heads.num_heads)
    return Plan(build_tree(paths, heads.num_heads).to(model.device), f"auto ({best} nodes)",
                profile.expected_tokens(paths), costs[best], costs[0])
