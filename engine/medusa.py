"""Medusa speculative decoding: heads that propose the next tokens from the base model's last
hidden state, one forward pass that verifies a whole candidate tree, greedy acceptance (the
output is exactly the base model's greedy output) and in-place compaction of the accepted
path's KV entries."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .kv_cache import KVCache
from .llama import Linear, LlamaModel
from .medusa_tree import MedusaTree


@dataclass
class MedusaHeads:
    """Head h: ResBlocks ``x + SiLU(W x + b)`` on the final-normed hidden state, then its own
    lm_head, or the base model's when ``lm_heads`` is None."""

    blocks: list[list[Linear]]  # [head][layer]
    lm_heads: list[Linear] | None

    @property
    def num_heads(self) -> int:
        return len(self.blocks)

    def __call__(self, hidden: torch.Tensor, base_lm_head: Linear) -> torch.Tensor:
        """hidden [..., H] -> logits [num_heads, ..., V] (float32)."""
        out = []
        for h, layers in enumerate(self.blocks):
            x = hidden
            for lin in layers:
                x = x + F.silu(lin(x))
            out.append((self.lm_heads[h] if self.lm_heads is not None else base_lm_head)(x).float())
        return torch.stack(out)


@dataclass
class StepResult:
    tokens: list[int]  # accepted this step: the root, then the accepted proposals
    root_logits: torch.Tensor  # base model's logits after the last accepted token
    head_logits: torch.Tensor  # the heads' logits from the same hidden state


def verify_greedy(model: LlamaModel, heads: MedusaHeads, tree: MedusaTree, cache: KVCache,
                  root_logits: torch.Tensor, head_logits: torch.Tensor) -> StepResult:
    """One Medusa step at batch 1. ``root_logits`` [V] and ``head_logits`` [num_heads, V] come
    from the last accepted token, which the cache holds; the root (the base model's next
    token) and the proposals after it are verified in one pass over the tree."""
    candidates = torch.cat([root_logits.argmax().view(1)] +
                           [head_logits[d].topk(k).indices for d, k in enumerate(tree.topk)])
    tokens = candidates[tree.tree_indices]  # [N]
    start = cache.length
    logits, hidden = model.forward(tokens[None], cache, start, all_logits=True,
                                   tree=(tree.position_offsets, tree.attn_mask), return_hidden=True)
    logits, hidden = logits[0], hidden[0]
    # node d of a path is accepted if it is the base model's greedy choice after node d - 1
    nodes = tree.retrieve_indices.clamp(min=0)
    predicted = logits.argmax(-1)[nodes]  # [R, D + 1]
    match = (tokens[nodes][:, 1:] == predicted[:, :-1]) & tree.valid[:, 1:]
    accepted_len = match.int().cumprod(1).sum(1)
    best = int(accepted_len.argmax())
    n = int(accepted_len[best]) + 1  # the one host sync of the step
    path = tree.retrieve_indices[best, :n]
    _compact(cache, start, path)
    last = path[-1]
    return StepResult(tokens[path].tolist(), logits[last], heads(hidden[last], model.lm_head))


def _compact(cache: KVCache, start: int, path: torch.Tensor) -> None:
    """Move the accepted nodes' keys/values (slots start + node) to slots start, start + 1, ...
    Node ids grow along a path, so every source is at or after its destination."""
    src = path + start
    dst = torch.arange(start, start + len(path), device=path.device)
    for buf in (cache.k, cache.v):
        buf.index_copy_(3, dst, buf.index_select(3, src))
    cache.length = start + len(path)


def generate_greedy(model: LlamaModel, heads: MedusaHeads, tree: MedusaTree, cache: KVCache, prompt: list[int],
                    max_new_tokens: int, eos_ids=frozenset()):
    """Greedy Medusa decoding of ``prompt``: yields the tokens accepted at each step (at least
    one), ending at EOS (not yielded), at ``max_new_tokens``, or where the context is full."""
    logits, hidden = model.forward(torch.tensor([prompt], device=model.device), cache, 0, return_hidden=True)
    root_logits, head_logits = logits[0, -1], heads(hidden[0, -1], model.lm_head)
    produced = 0
    while produced < max_new_tokens and cache.length + tree.num_nodes <= cache.max_len:
        step = verify_greedy(model, heads, tree, cache, root_logits, head_logits)
        tokens = step.tokens[:max_new_tokens - produced]
        stop = next((i for i, t in enumerate(tokens) if t in eos_ids), None)
        if stop is not None:
            if stop:
                yield tokens[:stop]
            return
        produced += len(tokens)
        yield tokens
        root_logits, head_logits = step.root_logits, step.head_logits
