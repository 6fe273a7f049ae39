"""Lookup as a proposer: no draft model and no heads. When the last tokens of the conversation
(up to the root the base model just chose) occurred before in it, the text that followed them
there is drafted: a chain, or a small tree where several earlier continuations differ and the
device verifies a few more nodes at no cost. Chats quote themselves (code being edited, a text
being corrected, an answer refined), and then whole lines are accepted in one step.

How much to draft is decided per step from what drafts have earned so far. Per length of the
matching n-gram, the chance that a drafted token is accepted given the one before it was (p) is
counted from the outcomes of that n-gram length's drafts, and also of the continuations found
while not drafting, checked against the tokens that then came: so a kind of match that stopped
paying is still watched, at no cost. A chain of L tokens then yields 1 + p + ... + p^L tokens per
step at the measured cost of a tree of L + 1 nodes (engine/decoding/speculative/step_costs.py);
the L with the most tokens per second is drafted, none (a one-token step) when no L beats it."""

from __future__ import annotations

import torch

from engine.decoding.lookup.index import NgramIndex
from engine.decoding.speculative.proposer import Draft, Proposer, root_only
from engine.decoding.speculative.tree import draft_tree

MAX_DRAFT = 10  # tokens per chain
BRANCHES = 3  # distinct earlier continuations drafted at most (where extra nodes cost nothing)
FREE = 1.02  # extra branches are drafted while the tree costs at most this times the chain alone
# a draft must promise this much more tokens per unit of step time than a plain step: the cost
# table and the acceptance estimate are both noisy, and a draft that only breaks even loses on
# ordinary chat, where most matches are short and wrong (bench/lookup_decode.py)
MARGIN = 1.1
PRIOR = (1.0, 1.0)  # (accepted, rejected) counts every n-gram length starts from: p = 0.5


def interpolate(costs: dict[int, float], n: int) -> float:
    """The cost of a tree of ``n`` nodes from the measured sizes (linear between them; beyond the
    largest, growing as between the last two)."""
    if n in costs:
        return costs[n]
    sizes = sorted(k for k in costs if k >= 1)
    lo = max((k for k in sizes if k < n), default=sizes[0])
    hi = min((k for k in sizes if k > n), default=None)
    if hi is None:
        prev = max((k for k in sizes if k < lo), default=None)
        slope = (costs[lo] - costs[prev]) / (lo - prev) if prev is not None else 0.0
        return costs[lo] + slope * (n - lo)
    return costs[lo] + (costs[hi] - costs[lo]) * (n - lo) / (hi - lo)


def cost_sizes(first: int, max_draft: int = MAX_DRAFT) -> list[int]:
    """The tree sizes whose verify steps are timed for lookup drafted beside a tree of ``first``
    nodes (1: lookup alone): up to ``first`` + ``max_draft`` and, alone, its branches."""
    last = first + max_draft * (BRANCHES if first == 1 else 1)
    near = {first + k for k in (0, 1, 2, 3, 4, 5, 6, 8) if first + k <= last}
    return sorted(near | {first + max_draft, last} | {n for n in (12, 16, 24) if first < n < last})


class Acceptance:
    """Per n-gram length, counts of drafted tokens accepted and of drafts cut short by a
    rejection: p = accepted / (accepted + rejected), a geometric run's estimate."""

    def __init__(self):
        self.counts: dict[int, list[float]] = {}

    def p(self, n: int) -> float:
        acc, rej = self.counts.get(n, PRIOR)
        return acc / (acc + rej)

    def record(self, n: int, accepted: int, drafted: int) -> None:
        c = self.counts.setdefault(n, list(PRIOR))
        c[0] += accepted
        c[1] += accepted < drafted


class LookupProposer(Proposer):
    """``costs``: the measured time of a verify step per tree size (sizes >= 1; see
    step_costs.py), only their ratios matter."""

    name = "lookup"

    def __init__(self, device, costs: dict[int, float], max_draft: int = MAX_DRAFT):
        self.device = torch.device(device)
        self.costs = costs
        self.max_draft = max_draft
        self.max_nodes = 1 + max_draft * BRANCHES
        self.index = NgramIndex()
        self.acceptance = Acceptance()
        self._watch: list[tuple[int, list[int], int]] = []  # (n, root + continuation, tokens checked) not drafted
        self._root_only = root_only(self.device)

    def begin(self, prompt, target) -> None:
        self.index.sync(prompt)
        self._watch = []

    def beside(self) -> tuple[float, int]:
        """(tokens per step, nodes) of the tree the chain joins: the root alone."""
        return 1.0, 1

    def draft_length(self, p: float) -> int:
        """The chain length with the most expected tokens per unit of step time (0: none); the
        step yields what the chain or the tree it joins yields, whichever is more."""
        base, nodes = self.beside()
        # with nothing drafted beside, a step is the plain one-token pass (size 0 in the table)
        alone = interpolate(self.costs, 0 if nodes == 1 and 0 in self.costs else nodes)
        best, best_rate, expected, term = 0, MARGIN * base / alone, 1.0, 1.0
        for length in range(1, self.max_draft + 1):
            term *= p
            expected += term
            rate = max(base, expected) / interpolate(self.costs, nodes + length)
            if rate > best_rate:
                best, best_rate = length, rate
        return best

    def candidates(self, root: int) -> tuple[int, list[list[int]]]:
        return self.index.continuations(self.index.tokens[-self.index.max_n + 1:] + [root], self.max_draft, BRANCHES)

    def propose(self, hidden, root) -> Draft:
        root = int(root)
        n, found = self.candidates(root)
        if not found:
            return self._root_only
        length = self.draft_length(self.acceptance.p(n))
        if length == 0:
            self._watch.append((n, [root] + found[0], 0))  # judged from the root on
            return self._root_only
        chains = [found[0][:length]]
        for other in found[1:]:  # more branches while the device verifies them for free
            trial = chains + [other[:length]]
            if interpolate(self.costs, trie_size(trial)) > FREE * interpolate(self.costs, 1 + len(chains[0])):
                break
            chains = trial
        return self.draft(chains, n)

    def draft(self, chains: list[list[int]], n: int) -> Draft:
        parents, tokens = [-1], []
        children: dict[tuple[int, int], int] = {}
        nodes = [add_chain(parents, children, tokens, chain) for chain in chains]
        tree = draft_tree(tuple(parents), str(self.device))
        return Draft(tree, torch.tensor(tokens, dtype=torch.long, device=self.device),
                     [""] + [self.name] * len(tokens), own=(n, nodes))

    def accepted(self, draft: Draft, path: list[int], tokens: list[int]) -> None:
        self._check_watched(tokens)
        if draft.own is not None:
            n, chains = draft.own
            on_path = set(path)
            got = max(sum(1 for _ in _prefix(chain, on_path)) for chain in chains)
            self.acceptance.record(n, got, max(len(c) for c in chains))
        self.index.extend(tokens)

    def _check_watched(self, tokens: list[int]) -> None:
        """Judge the continuations found but not drafted against the tokens that came."""
        still = []
        for n, cont, checked in self._watch:
            ok = checked
            for t in tokens:
                if ok == len(cont) or cont[ok] != t:
                    break
                ok += 1
            if ok < len(cont) and ok - checked == len(tokens):  # all matched so far: not judged yet
                still.append((n, cont, ok))
            else:  # (the root, which every step accepts, is not a draft)
                self.acceptance.record(n, max(ok - 1, 0), len(cont) - 1)
        self._watch = still[-self.max_draft:]


def add_chain(parents: list[int], children: dict[tuple[int, int], int], tokens: list[int], chain: list[int]
              ) -> list[int]:
    """Join ``chain`` to the tree ``parents`` (``children``: (parent, token) -> node) from the
    root: along the nodes that hold its tokens already, then as new nodes, whose tokens go to
    ``tokens``. Returns the chain's nodes."""
    node, path = 0, []
    for t in chain:
        child = children.get((node, t))
        if child is None:
            child = len(parents)
            children[(node, t)] = child
            parents.append(node)
            tokens.append(t)
        node = child
        path.append(node)
    return path


def trie_size(chains: list[list[int]]) -> int:
    """Nodes of the tree that merges ``chains`` (shared prefixes once), the root included."""
    return 1 + len({tuple(c[:i + 1]) for c in chains for i in range(len(c))})


def _prefix(chain: list[int], on_path: set[int]):
    for node in chain:
        if node not in on_path:
            return
        yield node


class LookupBeside(LookupProposer):
    """Lookup grafted onto another proposer's tree (Medusa's): the earlier continuation joins
    the heads' tree at the root, sharing the nodes whose tokens the heads proposed too, so a step
    accepts at least what either would alone. Its length is chosen as for lookup alone, against
    the tokens per step the other proposer's tree has been accepting (``expected`` to start:
    the Medusa plan's figure) and the cost of the nodes it adds."""

    def __init__(self, base: Proposer, device, costs: dict[int, float], expected: float | None = None,
                 max_draft: int = MAX_DRAFT):
        super().__init__(device, costs, max_draft)
        self.base = base
        self.name = f"{base.name}+{LookupProposer.name}"
        self.max_nodes = base.max_nodes + max_draft
        self.base_tokens = expected or 1.5  # tokens per step the base's own nodes yield (a running mean)

    def begin(self, prompt, target) -> None:
        super().begin(prompt, target)
        self.base.begin(prompt, target)

    def beside(self) -> tuple[float, int]:
        return self.base_tokens, self.base.max_nodes

    def propose(self, hidden, root) -> Draft:
        draft = self.base.propose(hidden, root)
        root = int(root)
        n, found = self.candidates(root)
        if not found:
            return draft
        length = self.draft_length(self.acceptance.p(n))
        if length == 0:
            self._watch.append((n, [root] + found[0], 0))
            return draft
        return self.graft(draft, found[0][:length], n)

    def graft(self, draft: Draft, chain: list[int], n: int) -> Draft:
        """``chain`` joined to ``draft``'s tree from the root: along the nodes that hold its
        tokens already, then as new nodes."""
        parents = draft.tree.parents.tolist()
        first_new = len(parents)
        children = {(p, t): k for k, (p, t) in enumerate(zip(parents[1:], draft.proposals.tolist()), start=1)}
        new_tokens: list[int] = []
        path = add_chain(parents, children, new_tokens, chain)
        sources = list(draft.sources) + [LookupProposer.name] * len(new_tokens)
        for node in path:
            if node < first_new:
                sources[node] = self.name  # drafted by both
        if not new_tokens:
            return Draft(draft.tree, draft.proposals, sources, draft.graph, own=(n, [path]))
        proposals = torch.cat([draft.proposals, torch.tensor(new_tokens, dtype=torch.long, device=self.device)])
        return Draft(draft_tree(tuple(parents), str(self.device)), proposals, sources, own=(n, [path]))

    def accepted(self, draft: Draft, path: list[int], tokens: list[int]) -> None:
        base_nodes = self.base.max_nodes
        own = next((i for i, node in enumerate(path) if node >= base_nodes), len(path))
        self.base_tokens += 0.1 * (min(own, len(tokens)) - self.base_tokens)
        self.base.accepted(draft, path, tokens)
        super().accepted(draft, path, tokens)
