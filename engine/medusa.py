"""Medusa speculative decoding: heads that propose the next tokens from the base model's last
hidden state, one forward pass that verifies a whole candidate tree, greedy acceptance (the
output is exactly the base model's greedy output) or typical acceptance (sampling), and
in-place compaction of the accepted path's KV entries."""

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
    root_logits: torch.Tensor  # base model's logits after the last accepted token (for the next root)
    head_logits: torch.Tensor  # the heads' logits from the same hidden state


def accept_greedy(path_tokens: torch.Tensor, path_logits: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Per path: how many proposals in a row equal the base model's greedy choice after their
    parent (so the output is exactly plain greedy decoding). path_tokens [R, D+1], path_logits
    [R, D+1, V] (logits after each node), valid [R, D+1] -> accepted lengths [R]."""
    match = (path_tokens[:, 1:] == path_logits[:, :-1].argmax(-1)) & valid[:, 1:]
    return match.int().cumprod(1).sum(1)


@dataclass
class TypicalAcceptance:
    """The Medusa paper's typical acceptance for sampling: a proposal is accepted when the base
    model gives it probability above min(threshold, alpha * exp(-entropy)) at temperature T."""

    temperature: float
    threshold: float = 0.09
    alpha: float = 0.3  # the paper recommends about sqrt(threshold)

    def __call__(self, path_tokens, path_logits, valid) -> torch.Tensor:
        p = torch.softmax(path_logits[:, :-1].float() / self.temperature, dim=-1)  # [R, D, V]
        cand = p.gather(-1, path_tokens[:, 1:, None]).squeeze(-1)
        entropy = -(p * torch.log(p + 1e-5)).sum(-1)
        limit = torch.minimum(torch.full_like(entropy, self.threshold), self.alpha * torch.exp(-entropy))
        return ((cand > limit) & valid[:, 1:]).int().cumprod(1).sum(1)


def verify(model: LlamaModel, heads: MedusaHeads, tree: MedusaTree, cache: KVCache, root: int,
           head_logits: torch.Tensor, accept=accept_greedy) -> StepResult:
    """One Medusa step at batch 1. ``root`` is the next token (chosen from the base model's
    logits after the last accepted token, which the cache holds); ``head_logits``
    [num_heads, V] are the heads' proposals from that same token. The root and the proposals
    are verified in one pass over the tree; the longest accepted path wins (ties: the first)."""
    candidates = torch.cat([torch.tensor([root], device=head_logits.device)] +
                           [head_logits[d].topk(k).indices for d, k in enumerate(tree.topk)])
    tokens = candidates[tree.tree_indices]  # [N]
    start = cache.length
    logits, hidden = model.forward(tokens[None], cache, start, all_logits=True,
                                   tree=(tree.position_offsets, tree.attn_mask), return_hidden=True)
    logits, hidden = logits[0], hidden[0]
    nodes = tree.retrieve_indices.clamp(min=0)
    accepted_len = accept(tokens[nodes], logits[nodes], tree.valid)
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


def generate(model: LlamaModel, heads: MedusaHeads, tree: MedusaTree, cache: KVCache, prompt: list[int],
             max_new_tokens: int, eos_ids=frozenset(), sampler=None, accept=accept_greedy):
    """Medusa decoding of ``prompt``: yields the tokens accepted at each step (at least one),
    ending at EOS (not yielded), at ``max_new_tokens``, or where the context is full.
    ``sampler`` picks each root from the base model's logits (argmax when None)."""
    pick = sampler if sampler is not None else (lambda logits: int(logits.argmax()))
    logits, hidden = model.forward(torch.tensor([prompt], device=model.device), cache, 0, return_hidden=True)
    root_logits, head_logits = logits[0, -1], heads(hidden[0, -1], model.lm_head)
    produced = 0
    while produced < max_new_tokens and cache.length + tree.num_nodes <= cache.max_len:
        step = verify(model, heads, tree, cache, pick(root_logits), head_logits, accept)
        tokens = step.tokens[:max_new_tokens - produced]
        stop = next((i for i, t in enumerate(tokens) if t in eos_ids), None)
        if stop is not None:
            if stop:
                yield tokens[:stop]
            return
        produced += len(tokens)
        yield tokens
        root_logits, head_logits = step.root_logits, step.head_logits
