"""Tree verification, for every proposer: one forward pass that verifies a whole draft tree
(engine/decoding/speculative/tree.py; drafted by Medusa heads, engine/decoding/medusa/, by lookup
in the conversation, engine/decoding/lookup/, or both), greedy acceptance (the output is exactly
the base model's greedy output) or typical acceptance (sampling), and in-place compaction of the
accepted path's KV entries."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from engine.decoding.speculative.tree import DraftTree
from engine.decoding.base import Accepted
from engine.model.cuda_graph import capture
from engine.model.kv_cache import KVCache
from engine.model.llama import LlamaModel

SMALL_TREE = 16  # on a CPU, trees up to this size compute every node's logits in one pass


class DenseTarget:
    """The dense KV cache as what a tree is verified over: the nodes' keys/values are written
    after the cached tokens, and the accepted path's are moved into place."""

    def __init__(self, model: LlamaModel, cache: KVCache):
        self.model, self.cache = model, cache

    @property
    def length(self) -> int:
        return self.cache.length

    @property
    def max_len(self) -> int:
        return self.cache.max_len

    def tree_hidden(self, tokens: torch.Tensor, tree: DraftTree) -> torch.Tensor:
        return self.model.tree_hidden(tokens[None], self.cache, self.cache.length, tree.position_offsets,
                                      tree.attn_mask)[0]

    def commit(self, start: int, path: torch.Tensor) -> None:
        _compact(self.cache, start, path)


class DMCTarget:
    """A DMC cache (engine/decoding/dmc.py's DMCForward) as what a tree is verified over: each
    node sees its path as token-by-token DMC decoding would; the accepted path's slots and
    state enter the cache as those steps leave them."""

    def __init__(self, dmc):
        self.dmc = dmc

    @property
    def length(self) -> int:
        return self.dmc.length

    @property
    def max_len(self) -> int:
        return self.dmc.max_len

    def tree_hidden(self, tokens: torch.Tensor, tree: DraftTree) -> torch.Tensor:
        return self.dmc.tree_hidden(tokens[None], tree.parents, tree.position_offsets)

    def commit(self, start: int, path: torch.Tensor) -> None:
        self.dmc.commit(path)


@dataclass
class StepResult:
    tokens: list[int]  # accepted this step: the root, then the accepted proposals
    root_logits: torch.Tensor  # base model's logits after the last accepted token (for the next root)
    hidden: torch.Tensor  # its final-normed hidden state [H] (the heads' input for the next step)
    path: list[int]  # the accepted nodes, root first: ``keep`` puts the first k of them in the cache
    start: int  # the cache length before the step

    def keep(self, target, k: int | None = None) -> None:
        """The first ``k`` accepted tokens (all: None) into ``target``'s cache, in order."""
        path = self.path if k is None else self.path[:k]
        target.commit(self.start, torch.tensor(path, dtype=torch.long, device=self.hidden.device))


def accept_greedy(logits: torch.Tensor, parent: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Whether each proposal equals the base model's greedy choice after its parent node (so the
    output is exactly plain greedy decoding). logits [I, V] (after the tree's inner nodes),
    parent [M] (each proposal's parent row in ``logits``), tokens [M] -> bool [M]."""
    return tokens == logits.argmax(-1)[parent]


@dataclass
class TypicalAcceptance:
    """The Medusa paper's typical acceptance for sampling: a proposal is accepted when the base
    model gives it probability above min(threshold, alpha * exp(-entropy)) at temperature T."""

    temperature: float
    threshold: float = 0.09
    alpha: float = 0.3  # the paper recommends about sqrt(threshold)

    def __call__(self, logits: torch.Tensor, parent: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        p = torch.softmax(logits.float() / self.temperature, dim=-1)  # [I, V]
        entropy = -(p * torch.log(p + 1e-5)).sum(-1)
        limit = torch.minimum(torch.full_like(entropy, self.threshold), self.alpha * torch.exp(-entropy))
        return p[parent, tokens] > limit[parent]


def accepted_lengths(ok: torch.Tensor, tree: DraftTree) -> torch.Tensor:
    """ok [N - 1] (per proposal node) -> accepted proposals per tree path [R]: the run of
    accepted nodes from the root down (padding never counts)."""
    ok = torch.cat([ok.new_ones(1), ok])
    return (ok[tree.retrieve_indices.clamp(min=0)] & tree.valid)[:, 1:].int().cumprod(1).sum(1)


class TreeGraph:
    """The verify pass of one tree over one cache as a CUDA graph (``LlamaModel.tree_step`` and
    the inner nodes' logits): one launch per step instead of hundreds of kernel launches."""

    def __init__(self, model: LlamaModel, tree: DraftTree, cache: KVCache):
        self.model, self.tree, self.cache = model, tree, cache
        self.tokens = torch.zeros(tree.num_nodes, dtype=torch.long, device=model.device)
        self.pos = torch.zeros((), dtype=torch.long, device=model.device)

        def run():
            hidden = model.tree_step(self.tokens[None], self.pos, cache, tree.position_offsets, tree.attn_mask)
            return hidden, model.logits(hidden.index_select(0, tree.inner))

        # warm-up runs write the tree's keys/values somewhere: at the end of the cache, which is
        # free (a step is only taken while the tree fits after the cached tokens)
        self.pos.fill_(cache.max_len - tree.num_nodes)
        self.graph, (self.hidden, self.logits) = capture(run)

    @classmethod
    def for_device(cls, model: LlamaModel, tree: DraftTree, cache: KVCache) -> "TreeGraph | None":
        """A graph on a GPU; None elsewhere (the verify pass runs eagerly)."""
        return cls(model, tree, cache) if model.device.type == "cuda" else None

    def __call__(self, tokens: torch.Tensor, start: int) -> tuple[torch.Tensor, torch.Tensor]:
        self.tokens.copy_(tokens)
        self.pos.fill_(start)
        self.graph.replay()
        self.cache.length = start + self.tree.num_nodes
        return self.hidden, self.logits


def verify(model: LlamaModel, tree: DraftTree, target, root: int | torch.Tensor, proposals: torch.Tensor,
           accept=accept_greedy, graph: TreeGraph | None = None) -> StepResult:
    """One verification step at batch 1. ``root`` is the next token (chosen from the base model's
    logits after the last accepted token, which the cache holds); ``proposals`` are the tokens of
    the tree's other nodes (drafted by a proposer). The root and the proposals are verified in
    one pass over the tree; the longest accepted path wins (ties: the first). Only the nodes with
    children go through the lm_head (plus the last accepted node when it is a leaf); on a CPU, a
    small tree's nodes all do, in one pass. The caller then keeps the accepted tokens it uses in
    the cache (``StepResult.keep``): a DMC cache cannot take back a token it was given."""
    root = torch.as_tensor(root, device=proposals.device).reshape(1)  # a device tensor stays there: no sync
    start = target.length
    if tree.num_nodes == 1 and isinstance(target, DenseTarget):  # nothing drafted: a plain decoding step
        hidden = model.last_hidden(root[None], target.cache, start)  # [1, H]
        return StepResult([int(root)], model.logits(hidden)[0], hidden[0], [0], start)
    tokens = torch.cat([root, proposals])  # [N]
    node_logits = None
    if graph is not None:
        hidden, logits = graph(tokens, start)
    else:
        hidden = target.tree_hidden(tokens, tree)  # [N, H]
        if model.device.type == "cpu" and tree.num_nodes <= SMALL_TREE:
            # with the CPU GEMM kernel, all nodes' logits cost about what the inner nodes' do,
            # and a leaf at the end of the accepted path then needs no second lm_head pass
            node_logits = model.logits(hidden)
            logits = node_logits.index_select(0, tree.inner)
        else:
            logits = model.logits(hidden.index_select(0, tree.inner))  # [I, V]
    lengths = accepted_lengths(accept(logits, tree.parent_slot, tokens[1:]), tree)
    host = torch.cat([lengths, tokens]).tolist()  # the one host sync of the step
    lengths, token_list = host[:len(tree.retrieve_rows)], host[len(tree.retrieve_rows):]
    best = max(range(len(lengths)), key=lambda r: (lengths[r], -r))
    path = tree.retrieve_rows[best][:lengths[best] + 1]
    last = path[-1]
    inner = tree.inner_rows.get(last)
    if node_logits is not None:
        root_logits = node_logits[last]
    else:
        root_logits = logits[inner] if inner is not None else model.logits(hidden[last:last + 1])[0]
    return StepResult([token_list[i] for i in path], root_logits, hidden[last], path, start)


def _compact(cache: KVCache, start: int, path: torch.Tensor) -> None:
    """Move the accepted nodes' keys/values (slots start + node) to slots start, start + 1, ...
    Node ids grow along a path, so every source is at or after its destination."""
    src = path + start
    dst = torch.arange(start, start + len(path), device=path.device)
    for buf in (cache.k, cache.v):
        buf.index_copy_(3, dst, buf.index_select(3, src))
    cache.length = start + len(path)


def generate(model: LlamaModel, proposer, target, root_logits: torch.Tensor, hidden: torch.Tensor,
             max_new_tokens: int, eos_ids=frozenset(), sampler=None, accept=accept_greedy):
    """Speculative decoding after a prefill (the cache holds the prompt; ``root_logits`` and
    ``hidden`` are the base model's logits and final-normed hidden state after its last token):
    yields the tokens accepted at each step (at least one) as ``Accepted``, ending at EOS (not
    yielded), at ``max_new_tokens``, or where the context is full. Every yielded token's
    keys/values are in the cache, in order. ``proposer`` drafts each step's tree
    (engine/decoding/speculative/proposer.py); ``target``: what the tree is verified over
    (``DenseTarget`` over a KV cache, ``DMCTarget`` over a DMC cache). ``sampler`` picks each
    root (argmax when None)."""
    pick = sampler if sampler is not None else (lambda logits: logits.argmax())
    produced = 0
    while produced < max_new_tokens and target.length + proposer.max_nodes <= target.max_len:
        root = pick(root_logits)
        draft = proposer.propose(hidden, root)
        step = verify(model, draft.tree, target, root, draft.proposals, accept, draft.graph)
        tokens = step.tokens[:max_new_tokens - produced]
        stop = next((i for i, t in enumerate(tokens) if t in eos_ids), None)
        kept = len(tokens) if stop is None else stop
        step.keep(target, kept)  # the cache holds what is yielded, no more
        proposer.accepted(draft, step.path, step.tokens[:kept])
        drafted = draft.tree.num_nodes - 1, draft.tree.depth
        if stop is not None:
            if stop:
                yield Accepted(tokens[:stop], draft.drafted_by(step.path[:stop]), *drafted)
            return
        produced += len(tokens)
        yield Accepted(tokens, draft.drafted_by(step.path[:len(tokens)]), *drafted)
        root_logits, hidden = step.root_logits, step.hidden


def prefill_and_generate(model: LlamaModel, proposer, cache: KVCache, prompt: list[int], max_new_tokens: int,
                         eos_ids=frozenset(), sampler=None, accept=accept_greedy):
    """``generate`` after one prefill pass of ``prompt`` from an empty cache (tests, benchmarks)."""
    hidden = model.last_hidden(torch.tensor([prompt], device=model.device), cache, 0)[0]
    proposer.begin(prompt, DenseTarget(model, cache))
    yield from generate(model, proposer, DenseTarget(model, cache), model.logits(hidden), hidden, max_new_tokens,
                        eos_ids, sampler, accept)
