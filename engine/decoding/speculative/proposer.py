"""What the speculative decoder asks of a proposer, and what one step's draft is.

    proposer.begin(prompt, target)      # a reply starts: the conversation so far (token ids) and
                                        # what its trees are verified over (verify.DenseTarget,
                                        # DMCTarget)
    proposer.propose(hidden, root)      # -> Draft: the tree to verify after ``root`` (the token
                                        # the base model chose next, from the final-normed hidden
                                        # state ``hidden``)
    proposer.accepted(draft, path, tokens)  # what the step accepted: the tree's nodes (root
                                        # first) and their tokens, as the cache keeps them
    proposer.max_nodes                  # the largest tree it drafts (room it needs in the cache)

The proposers: engine/decoding/medusa/proposer.py (the heads' fixed tree) and
engine/decoding/lookup/proposer.py (continuations found earlier in the conversation, alone or
grafted onto the heads' tree)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from engine.decoding.speculative.tree import DraftTree, draft_tree


@dataclass
class Draft:
    tree: DraftTree
    proposals: torch.Tensor  # the tokens of nodes 1.. [N - 1], on the model's device
    sources: list[str]  # per node (root first): the proposer that drafted it ("" for the root)
    graph: object = None  # the verify pass of this tree as a CUDA graph (verify.TreeGraph), or None
    own: object = None  # what the proposer that drafted it keeps about it (lookup: its chains' nodes)

    def drafted_by(self, path: list[int]) -> list[str]:
        return [self.sources[i] for i in path]


def root_only(device) -> Draft:
    """The draft of nothing: a one-token step."""
    return Draft(draft_tree((-1,), str(device)), torch.zeros(0, dtype=torch.long, device=device), [""])


class Proposer:
    name = ""
    max_nodes = 1

    def begin(self, prompt: list[int], target) -> None:
        pass

    def propose(self, hidden: torch.Tensor, root) -> Draft:
        raise NotImplementedError

    def accepted(self, draft: Draft, path: list[int], tokens: list[int]) -> None:
        pass
