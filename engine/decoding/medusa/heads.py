"""Loading Medusa heads, strictly (a missing or extra head tensor is an error):

- the modelopt / TensorRT-LLM export: heads beside the base model in its safetensors files,
  ``medusa_heads.{h}.{l}.linear.{weight,bias}`` (ResBlocks) and ``medusa_heads.{h}.{L}.weight``
  (each head's lm_head), sizes in config.json ``"medusa": {num_medusa_heads, num_medusa_layers}``;
  FP8 like the base model (``weight_scale`` / ``input_scale``) when the checkpoint is FP8;
- FasterDecoding's ``medusa_lm_head.safetensors`` (or ``.pt``, read with ``weights_only=True``):
  ``{h}.{l}.linear.{weight,bias}`` and, with per-head lm_heads, ``{h}.{L}.weight``; without them
  (Medusa-2) the heads share the base model's lm_head. chatapp's own heads add ``token_ids``
  (the token subset they score), ``{h}.root.weight`` (their input from the root token's
  embedding) and ``{h}.path.{j}.weight`` (from the path's token at depth j = 1..h; see
  MedusaHeads)."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from engine.decoding.medusa.tree import MedusaTree
from engine.errors import EngineError
from engine.formats.fp8 import Fp8Format
from engine.formats.tensor_source import TensorSource
from engine.formats.torch_pickle import load_weights_only
from engine.model.linear import Fp8Linear, Int8Linear, Linear, default_splits
from engine.model.llama import LlamaModel
from engine.hub import layout

TOKEN_IDS = "token_ids"  # heads on the shared lm_head that score only these tokens (ours)
_ROOT = re.compile(r"^(\d+)\.root\.weight$")  # a head's input from the root token's embedding (ours)
_PATH = re.compile(r"^(\d+)\.path\.(\d+)\.weight$")  # ... and from its path's tokens (ours)
_KEY = re.compile(r"^(\d+)\.(\d+)\.(linear\.weight|linear\.bias|weight|weight_scale|input_scale|linear\.weight_scale|"
                  r"linear\.input_scale)$")


@dataclass
class MedusaHeads:
    """Head h: ResBlocks ``x + SiLU(W x + b)`` on the final-normed hidden state, then its own
    lm_head, or the base model's when ``lm_heads`` is None. ``token_ids``: with the base
    lm_head, the heads may score only these tokens (its rows, taken once): proposals come from
    that subset, at a fraction of the full vocabulary's cost.

    ``root_proj`` (chatapp's heads for the embedded model): head h's input is the hidden state
    plus ``root_proj[h]`` applied to the base model's embedding of the root, the token the base
    model has already chosen to come next (it is known before the heads run). Knowing that token,
    a head guessing the one after it is right much more often than from the hidden state alone.

    ``path_proj`` (with ``root_proj``): head h's input also gets ``path_proj[h][j - 1]`` applied to
    the embedding of the token at depth j of the path it extends (j = 1..h), as Hydra's heads do:
    head h then proposes the children of each tree node of depth h from that node's own path,
    one row per parent node, instead of one list for every node of the depth."""

    blocks: list[list[Linear]]  # [head][layer]
    lm_heads: list[Linear] | None
    token_ids: torch.Tensor | None = None
    root_proj: list[Linear] | None = None
    path_proj: list[list[Linear]] | None = None  # [head h][j - 1], j = 1..h
    _subset: Linear | None = field(default=None, repr=False)

    @property
    def num_heads(self) -> int:
        return len(self.blocks)

    def vocabulary(self, base_lm_head: Linear) -> int:
        """How many tokens each head scores (the ranks a tree may ask for)."""
        if self.lm_heads is not None:
            return self.lm_heads[0].out_features
        return len(self.token_ids) if self.token_ids is not None else base_lm_head.out_features

    def _output(self, h: int, base_lm_head: Linear) -> Linear:
        if self.lm_heads is not None:
            return self.lm_heads[h]
        if self.token_ids is None:
            return base_lm_head
        if self._subset is None:
            rows = output_rows(base_lm_head, self.token_ids)
            if Int8Linear.in_panels(rows.device):  # in int8, a quarter of float32's bytes (they only propose)
                self._subset = Int8Linear.quantize(rows)
            else:
                dtype = self.blocks[0][0].dense().dtype  # the model's (an FP8 lm_head's rows come dequantized)
                self._subset = Linear(rows.t().to(dtype), None, default_splits(rows.device))
        return self._subset

    def __call__(self, hidden: torch.Tensor, base_lm_head: Linear, num: int | None = None,
                 root_embedding: torch.Tensor | None = None) -> torch.Tensor:
        """hidden [..., H] (and, for heads with ``root_proj``, the root's embedding [..., H]) ->
        the first ``num`` heads' logits [num, ..., V or len(token_ids)] (float32), for heads
        without ``path_proj``."""
        if self.root_proj is not None and root_embedding is None:
            raise ValueError("these Medusa heads need the root token's embedding")
        return torch.stack([self._head(h, hidden, base_lm_head, root_embedding)
                            for h in range(len(self.blocks[:num]))])

    def _head(self, h: int, hidden: torch.Tensor, base_lm_head: Linear, root_embedding: torch.Tensor | None,
              path_embeddings: list[torch.Tensor] = ()) -> torch.Tensor:
        x = hidden if self.root_proj is None else self.root_proj[h](root_embedding, residual=hidden)
        for proj, e in zip(self.path_proj[h] if self.path_proj else [], path_embeddings):
            x = proj(e, residual=x)
        for lin in self.blocks[h]:
            x = x + F.silu(lin(x))
        return self._output(h, base_lm_head)(x).float()

    def _tokens(self, idx: torch.Tensor) -> torch.Tensor:
        return idx if self.token_ids is None else self.token_ids[idx]

    def propose(self, hidden: torch.Tensor, model: LlamaModel, tree: MedusaTree,
                root: int | torch.Tensor) -> torch.Tensor:
        """The tokens of the tree's nodes 1.. [N - 1] after ``root``, from the hidden state that
        chose it: node (r0, r1, ...) holds the r_d-th most likely token of head d (given its
        parent's path, for heads with ``path_proj``)."""
        emb = None
        if self.root_proj is not None:
            emb = F.embedding(torch.as_tensor(root, device=hidden.device).reshape(()), model.embed).to(hidden.dtype)
        if self.path_proj is None:  # one list per head, shared by every node of its depth
            logits = self(hidden, model.lm_head, tree.depth, emb)
            idx = torch.cat([logits[d].topk(k).indices for d, k in enumerate(tree.topk)])
            return self._tokens(idx)[tree.tree_indices[1:] - 1]
        tokens = torch.zeros(tree.num_nodes, dtype=torch.long, device=hidden.device)
        for d, level in enumerate(tree.levels):  # the nodes of depth d + 1, parent by parent
            rows = len(level.parents)
            paths = [F.embedding(tokens[level.ancestors[:, j]], model.embed).to(hidden.dtype) for j in range(d)]
            logits = self._head(d, hidden.expand(rows, -1), model.lm_head, emb.expand(rows, -1), paths)
            top = logits.topk(tree.topk[d], dim=-1).indices  # [P, k]
            tokens[level.children] = self._tokens(top[level.child_parent, level.child_rank])
        return tokens[1:]


@dataclass
class Profile:
    """Frequency with which each path of ranks is right, most frequent first."""

    paths: list[tuple[tuple[int, ...], float]]

    @classmethod
    def read(cls, path: Path, cache: str = "plain") -> "Profile":
        """The profile measured over ``cache`` ("plain": the dense KV cache, "dmc"): the one under
        ``profiles`` when the file has one for it (training/medusa.py --profile-over), else the
        held-out profile of training (over the dense cache the heads were trained on)."""
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
            entries = data.get("profiles", {}).get(cache, data)["profile"]
            return cls([(tuple(int(r) for r in e["path"]), float(e["freq"])) for e in entries])
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise EngineError(f"{path}: not a Medusa acceptance profile ({e})") from None

    def tree_paths(self, num_nodes: int, num_heads: int) -> list[tuple[int, ...]]:
        """The ``num_nodes - 1`` most frequent paths (prefix-closed: a path is never more
        frequent than its parent, and ties keep the shorter first)."""
        usable = [p for p, _ in self.paths if len(p) <= num_heads]
        return usable[:num_nodes - 1]

    def expected_tokens(self, paths: list[tuple[int, ...]]) -> float:
        freq = dict(self.paths)
        return 1.0 + sum(freq.get(tuple(p), 0.0) for p in paths)


def _layout(names: set[str], prefix: str, where) -> tuple[int, int, bool]:
    """(heads, layers, own lm_heads) from the tensor names under ``prefix``; unexpected names are errors."""
    heads, layers, own = set(), set(), set()
    for name in names:
        if not name.startswith(prefix) or name == TOKEN_IDS or _ROOT.match(name[len(prefix):]) or \
                _PATH.match(name[len(prefix):]):
            continue
        m = _KEY.match(name[len(prefix):])
        if m is None:
            raise EngineError(f"{where}: unexpected Medusa tensor {name!r}")
        h, idx, kind = int(m[1]), int(m[2]), m[3]
        heads.add(h)
        (layers if kind.startswith("linear") else own).add((h, idx))
    if not heads:
        raise EngineError(f"{where}: no Medusa head tensors ({prefix}…)")
    n_heads = max(heads) + 1
    n_layers = max(i for _, i in layers) + 1 if layers else 0
    return n_heads, n_layers, bool(own)


def _build(src, prefix: str, n_heads: int, n_layers: int, own: bool, hidden: int, vocab: int, device, dtype,
           fmt: Fp8Format | None) -> MedusaHeads:
    expected = {TOKEN_IDS}

    def linear(name: str, out: int, bias: bool):
        expected.add(name + ".weight")
        if bias:
            expected.add(name + ".bias")
        b = src.get_shaped(name + ".bias", (out,)).to(device, dtype) if bias else None
        if fmt is not None and src.get(name + ".weight").dtype == torch.float8_e4m3fn:
            expected.update({name + ".weight_scale", name + ".input_scale"} & src.names())
            return Fp8Linear(*fmt.read(src, [(name, (out, hidden))], device), b)
        w = src.get_shaped(name + ".weight", (out, hidden))
        return Linear(w.to(device, dtype).t(), b, default_splits(device))

    blocks = [[linear(f"{prefix}{h}.{l}.linear", hidden, True) for l in range(n_layers)] for h in range(n_heads)]
    lm_heads = [linear(f"{prefix}{h}.{n_layers}", vocab, False) for h in range(n_heads)] if own else None
    has_root = any(_ROOT.match(n[len(prefix):]) for n in src.names() if n.startswith(prefix))
    root_proj = [linear(f"{prefix}{h}.root", hidden, False) for h in range(n_heads)] if has_root else None
    path_names = sorted(n for n in src.names() if n.startswith(prefix) and _PATH.match(n[len(prefix):]))
    if path_names and not has_root:
        raise EngineError(f"{src.file_of(path_names[0])}: Medusa tensor {path_names[0]!r} (a path input) needs "
                          f"the heads' root inputs ({prefix}{{h}}.root.weight), which are missing")
    path_proj = [[linear(f"{prefix}{h}.path.{j}", hidden, False) for j in range(1, h + 1)]
                 for h in range(n_heads)] if path_names else None
    extra = sorted(n for n in src.names() if n.startswith(prefix) and n not in expected)
    if extra:
        raise EngineError(f"{src.file_of(extra[0])}: unexpected Medusa tensor {extra[0]!r}")
    token_ids = None
    if TOKEN_IDS in src.names():
        token_ids = src.get(TOKEN_IDS)
        if own or token_ids.dim() != 1 or token_ids.dtype != torch.int64 or not len(token_ids) or \
                int(token_ids.min()) < 0 or int(token_ids.max()) >= vocab:
            raise EngineError(f"{src.file_of(TOKEN_IDS)}: {TOKEN_IDS!r} must be a non-empty int64 list of token ids "
                              f"below {vocab}, for heads that share the base lm_head")
        token_ids = token_ids.to(device)
    return MedusaHeads(blocks, lm_heads, token_ids, root_proj, path_proj)


def output_rows(lm_head: Linear | Fp8Linear | Int8Linear, token_ids: torch.Tensor) -> torch.Tensor:
    """Rows ``token_ids`` of an output projection, [len(token_ids), hidden] (an FP8 or int8 one's
    dequantized: the heads only propose, the model's own lm_head verifies)."""
    return lm_head.dense().t()[token_ids.to(lm_head.device)]


def shipped_heads(name: str, cfg, device, dtype, cache: str = "plain"):
    """The heads chatapp ships for a model (assets/medusa/<name>.safetensors, trained by
    training/medusa.py) and their acceptance profile over ``cache`` (see ``Profile.read``), or
    (None, None)."""
    path = layout.shipped_medusa(name)
    if path is None:
        return None, None
    heads = load_fasterdecoding(path, cfg.hidden_size, cfg.vocab_size, device, dtype)
    profile_path = path.with_suffix(".json")
    return heads, (Profile.read(profile_path, cache) if profile_path.exists() else None)


def load_heads(model_dir: Path, medusa: dict | None, src: TensorSource, hidden: int, vocab: int, device, dtype,
               fmt: Fp8Format | None = None) -> MedusaHeads | None:
    """The checkpoint's Medusa heads (``medusa``: config.json's "medusa" entry), or None when it
    has none."""
    model_dir = Path(model_dir)
    if medusa is not None:  # modelopt / TensorRT-LLM export
        try:
            n_heads, n_layers = int(medusa["num_medusa_heads"]), int(medusa["num_medusa_layers"])
        except (KeyError, TypeError, ValueError) as e:
            raise EngineError(f"{model_dir / 'config.json'}: bad 'medusa' entry ({e})") from None
        found = _layout(src.names(), "medusa_heads.", model_dir)
        if found[:2] != (n_heads, n_layers):
            raise EngineError(f"{model_dir}: config.json says {n_heads} Medusa heads of {n_layers} layers, the "
                              f"checkpoint holds {found[0]} heads of {found[1]} layers")
        return _build(src, "medusa_heads.", n_heads, n_layers, found[2], hidden, vocab, device, dtype, fmt)
    for name in layout.MEDUSA_FILES:
        path = model_dir / name
        if path.exists():
            return load_fasterdecoding(path, hidden, vocab, device, dtype)
    return None


def load_fasterdecoding(path: Path, hidden: int, vocab: int, device, dtype) -> MedusaHeads:
    path = Path(path)
    if path.suffix == ".pt":
        tensors = load_weights_only(path)  # a pickle that would run code is refused
        if not isinstance(tensors, dict) or not all(isinstance(v, torch.Tensor) for v in tensors.values()):
            raise EngineError(f"{path}: expected a dict of tensors")
        src = TensorSource.from_tensors(tensors, path)
    else:
        src = TensorSource(path.parent, files=[path])
    prefix = "medusa_head." if any(n.startswith("medusa_head.") for n in src.names()) else ""
    n_heads, n_layers, own = _layout(src.names(), prefix, path)
    return _build(src, prefix, n_heads, n_layers, own, hidden, vocab, device, dtype, None)
