"""DMC inference on a tiny random Llama whose decision neurons are wired to token features we
choose, so that merges, appends and runs longer than the 12-token window all happen:

- token-by-token DMC decoding equals a slow full-sequence oracle written from the training-time
  formulation (a pooling matrix over each merge run's window and the additive eval mask
  -50000 * alpha_{j+1} with the diagonal unmasked): logits close, greedy tokens equal;
- the parallel prefill leaves the same slots and state as the token-by-token one;
- with no merges at all, DMC equals the plain forward pass with dim D-1 of q and k zeroed;
- the cache's byte counts."""

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from engine.formats.tensor_source import TensorSource
from engine.config import ModelConfig
from engine.decoding.dmc import DMCForward
from engine.errors import EngineError
from engine.model.llama import LlamaModel
from engine.model.weights import from_source

VOCAB, HIDDEN, HEADS, KV_HEADS, HEAD_DIM, LAYERS, FFN = 32, 64, 4, 2, 16, 2, 96
CONTROL = 4  # features 0..3: one merge-decision feature per (layer, KV head)
WEIGHT_FEATURES = (4, 5)  # features feeding the importance-weight neurons


def tiny_config(vocab=VOCAB) -> ModelConfig:
    return ModelConfig(hidden_size=HIDDEN, intermediate_size=FFN, num_layers=LAYERS, num_heads=HEADS,
                       num_kv_heads=KV_HEADS, head_dim=HEAD_DIM, vocab_size=vocab, max_position_embeddings=256,
                       rms_norm_eps=1e-5)


def tiny_tensors(decisions: bool = True, seed: int = 0) -> dict[str, torch.Tensor]:
    """HF-named weights. Token t's feature f < 4 is +1 if bit f of t is set, else -1, and nothing
    writes to features 0..5 of the residual stream, so they stay the embedding's. With
    ``decisions``, k[D-1] of KV head g in layer l is 50 x feature 2l+g (normed): a merge iff
    that bit is set; q[D-1] of each query head reads a negative feature, for weights that vary
    over (0, 1). Without, the decision rows are small and random: never a merge."""
    g = torch.Generator().manual_seed(seed)
    d = HEAD_DIM

    def rnd(*shape, std=0.15):
        return torch.randn(*shape, generator=g) * std

    t = {}
    embed = torch.randn(VOCAB, HIDDEN, generator=g)
    bits = (torch.arange(VOCAB)[:, None] >> torch.arange(CONTROL)[None, :]) & 1
    embed[:, :CONTROL] = bits.float() * 2 - 1
    embed[:, WEIGHT_FEATURES[0]] = -torch.rand(VOCAB, generator=g) * 2 - 0.3
    embed[:, WEIGHT_FEATURES[1]] = -torch.rand(VOCAB, generator=g) * 2 - 0.3
    t["model.embed_tokens.weight"] = embed
    for li in range(LAYERS):
        p = f"model.layers.{li}."
        q, k, v = rnd(HEADS * d, HIDDEN), rnd(KV_HEADS * d, HIDDEN), rnd(KV_HEADS * d, HIDDEN)
        for kvh in range(KV_HEADS):
            row = k[kvh * d + d - 1]
            if decisions:
                row.zero_()
                row[2 * li + kvh] = 50.0
            else:
                row.mul_(0.1)
        for head in range(HEADS):
            row = q[head * d + d - 1]
            if decisions:
                row.zero_()
                row[WEIGHT_FEATURES[head % 2]] = 3.0
        o, down = rnd(HIDDEN, HEADS * d), rnd(HIDDEN, FFN)
        o[: CONTROL + 2] = 0  # the control features pass through every layer unchanged
        down[: CONTROL + 2] = 0
        t.update({p + "input_layernorm.weight": 1 + rnd(HIDDEN, std=0.05),
                  p + "post_attention_layernorm.weight": 1 + rnd(HIDDEN, std=0.05),
                  p + "self_attn.q_proj.weight": q, p + "self_attn.k_proj.weight": k,
                  p + "self_attn.v_proj.weight": v * 3,
                  p + "self_attn.o_proj.weight": o, p + "mlp.gate_proj.weight": rnd(FFN, HIDDEN),
                  p + "mlp.up_proj.weight": rnd(FFN, HIDDEN), p + "mlp.down_proj.weight": down})
    t["model.norm.weight"] = torch.ones(HIDDEN)
    t["lm_head.weight"] = rnd(VOCAB, HIDDEN, std=1.0)
    return t


def build(tensors) -> LlamaModel:
    return from_source(tiny_config(), TensorSource.from_tensors(tensors, Path("tiny.pt")), "cpu", torch.float32)


@pytest.fixture(scope="module")
def dmc_model() -> LlamaModel:
    return build(tiny_tensors(decisions=True))


def prompts() -> torch.Tensor:
    """Two prompts of 40 tokens. Row 0 has a 20-token run of odd tokens (bit 0 set: layer 0,
    KV head 0 merges 20 times in a row, past the 12-token window) and a run of tokens with
    bits 2 and 3 set; row 1 is random."""
    g = torch.Generator().manual_seed(1)
    rand = lambda n: torch.randint(0, VOCAB, (n,), generator=g)
    row0 = torch.cat([rand(3), rand(20) | 1, rand(4), rand(13) | 12])
    return torch.stack([row0, rand(40)])


# ---- the oracle ----------------------------------------------------------------------------
MASK_CONST = -50000.0


def rope(x, cos, sin):
    """Rotate-half RoPE with the model's signed-sin table, dim D-1 zeroed before and after."""
    x = x.clone()
    x[..., -1] = 0
    out = x * cos + x.roll(x.shape[-1] // 2, -1) * sin
    out[..., -1] = 0
    return out


def oracle(model: LlamaModel, ids: torch.Tensor, init_val=5.0, window=12):
    """Full-sequence DMC forward with hard decisions: logits [B, T, V] and each layer's merge
    bits [B, T, Hkv]. Written independently of engine/decoding/dmc.py: token i's key/value row is the
    weighted mean over a pooling matrix row (the last <= window tokens of i's merge run), and
    attention uses the additive mask MASK_CONST * alpha_{j+1} over keys j < i, own row unmasked."""
    cfg = model.cfg
    bsz, t = ids.shape
    nh, nkv, d = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    groups = nh // nkv
    cos, sin = model.rope(t)
    cos, sin = cos[:t, None], sin[:t, None]
    x = F.embedding(ids, model.embed)
    all_alpha = []
    for layer in model.layers:
        qkv = layer.qkv(F.rms_norm(x, (cfg.hidden_size,), layer.attn_norm, cfg.rms_norm_eps))
        qkv = qkv.view(bsz, t, nh + 2 * nkv, d).double()
        q, k, v = qkv[:, :, :nh], qkv[:, :, nh:nh + nkv], qkv[:, :, nh + nkv:]
        alpha = k[..., -1] > init_val
        alpha[:, 0] = False
        w = torch.sigmoid(q[..., -1].reshape(bsz, t, nkv, groups).mean(-1) + init_val) + 2 ** -7
        k0 = k.clone()
        k0[..., -1] = 0
        pool = torch.zeros(bsz, nkv, t, t, dtype=torch.float64)
        for b in range(bsz):
            for h in range(nkv):
                for i in range(t):
                    j = i
                    while True:
                        pool[b, h, i, j] = w[b, j, h]
                        if not alpha[b, j, h] or j == i - window + 1:
                            break
                        j -= 1
        kp = torch.einsum("bhij,bjhd->bihd", pool, k0) / pool.sum(-1).transpose(1, 2)[..., None]
        vp = torch.einsum("bhij,bjhd->bihd", pool, v) / pool.sum(-1).transpose(1, 2)[..., None]
        qr, kr = rope(q, cos.double(), sin.double()), rope(kp, cos.double(), sin.double())
        nxt = torch.zeros_like(alpha)
        nxt[:, :-1] = alpha[:, 1:]  # alpha_{j+1}
        bias = MASK_CONST * nxt.double().permute(0, 2, 1)[:, :, None, :].expand(bsz, nkv, t, t).clone()
        bias.diagonal(dim1=2, dim2=3).zero_()
        bias = bias.masked_fill(torch.ones(t, t, dtype=torch.bool).triu(1), float("-inf"))
        out = torch.empty(bsz, t, nh, d, dtype=torch.float64)
        for hh in range(nh):
            g = hh // groups
            s = qr[:, :, hh] @ kr[:, :, g].transpose(1, 2) / math.sqrt(d) + bias[:, g]
            out[:, :, hh] = s.softmax(-1) @ vp[:, :, g]
        x = layer.o(out.reshape(bsz, t, cfg.q_size).to(x.dtype), residual=x)
        x = model.mlp(layer, x)
        all_alpha.append(alpha)
    logits = model.logits(F.rms_norm(x, (cfg.hidden_size,), model.norm, cfg.rms_norm_eps))
    return logits, all_alpha


def slot_counts(alpha: torch.Tensor) -> torch.Tensor:
    """Slots per (b, KV head) after all tokens: one per append."""
    return (~alpha).sum(1)


def longest_run(alpha: torch.Tensor) -> int:
    best = 0
    for b in range(alpha.shape[0]):
        for h in range(alpha.shape[2]):
            n = 0
            for a in alpha[b, :, h].tolist():
                n = n + 1 if a else 1
                best = max(best, n)
    return best


def greedy(dmc: DMCForward, ids: torch.Tensor, new: int, parallel: bool):
    """Prompt logits [B, T, V], then `new` greedy steps: all logits [B, T + new - 1, V] and the tokens."""
    logits = [dmc.prefill(ids, parallel=parallel, all_logits=True)]
    tokens = []
    nxt = logits[0][:, -1].argmax(-1)
    for _ in range(new):
        tokens.append(nxt)
        step = dmc.step(nxt)
        logits.append(step[:, None])
        nxt = step.argmax(-1)
    return torch.cat(logits, dim=1)[:, :-1], torch.stack(tokens, dim=1)


# ---- tests ---------------------------------------------------------------------------------
@pytest.mark.parametrize("parallel", [False, True])
def test_dmc_decoding_equals_the_full_sequence_oracle(dmc_model, parallel):
    ids = prompts()
    new = 12
    dmc = DMCForward(dmc_model, batch=2, max_len=128)
    got, tokens = greedy(dmc, ids, new, parallel)
    seq = torch.cat([ids, tokens], dim=1)
    want, alphas = oracle(dmc_model, seq)
    # the test covers what it claims: merges, appends, window overflow, ragged heads
    for alpha in alphas:
        assert alpha.any() and (~alpha).sum() > 2 * alpha.shape[2]
    assert longest_run(alphas[0]) > 12
    counts = torch.stack([slot_counts(a) for a in alphas])  # [layers, B, Hkv]
    assert len(set(counts.flatten().tolist())) > 3
    assert torch.equal(dmc.cache.lens.cpu(), counts.to(torch.int32))
    torch.testing.assert_close(got, want[:, :-1], atol=2e-4, rtol=2e-4)
    assert torch.equal(tokens, want[:, ids.shape[1] - 1:-1].argmax(-1))


def test_parallel_prefill_leaves_the_same_cache_and_state(dmc_model):
    ids = prompts()
    seq_dmc = DMCForward(dmc_model, batch=2, max_len=128)
    par_dmc = DMCForward(dmc_model, batch=2, max_len=128)
    par_dmc.prefill_chunk = 7  # several attention chunks, the last one partial
    want = seq_dmc.prefill(ids, parallel=False, all_logits=True)
    got = par_dmc.prefill(ids, parallel=True, all_logits=True)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    assert_same_cache(seq_dmc.cache, par_dmc.cache)
    # and decoding goes on the same from both
    tok = want[:, -1].argmax(-1)
    torch.testing.assert_close(par_dmc.step(tok), seq_dmc.step(tok), atol=1e-4, rtol=1e-4)


def zero_rows(tensors, dim):
    """A copy with row ``dim`` of every q and k head's projection zeroed."""
    out = dict(tensors)
    for li in range(LAYERS):
        for name, heads in (("q_proj", HEADS), ("k_proj", KV_HEADS)):
            key = f"model.layers.{li}.self_attn.{name}.weight"
            w = out[key].clone()
            w.view(heads, HEAD_DIM, HIDDEN)[:, dim] = 0
            out[key] = w
    return out


def assert_same_cache(a, b):
    """Same lengths, run lengths, sums, window and slot contents (page numbers may differ)."""
    for name in ("lens", "run"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    for name in ("ksum", "vsum", "wsum", "win_k", "win_v", "win_w"):
        torch.testing.assert_close(getattr(b, name), getattr(a, name), atol=1e-5, rtol=1e-5, msg=name)
    assert a.length == b.length
    for li in range(LAYERS):
        for bi in range(a.batch):
            for h in range(KV_HEADS):
                n = int(a.lens[li, bi, h])
                got = []
                for c in (a, b):
                    pages = c.block_table[li, bi, h, : -(-n // c.page_size)].long()
                    assert (pages >= 0).all()
                    got.append((c.k_pages[pages].reshape(-1, HEAD_DIM)[:n], c.v_pages[pages].reshape(-1, HEAD_DIM)[:n]))
                torch.testing.assert_close(got[1], got[0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("splits", [(18, 22), (18, 1, 21), (5, 30, 5), (1, 39)])
def test_parallel_prefill_continues_from_a_held_cache(dmc_model, splits):
    """Prompts after earlier tokens: the split at 18 falls in row 0's 20-token merge run, 15
    tokens in (past the window), so the new tokens' windows reach into the window buffer and
    the first new token merges into the last cached slot."""
    ids = prompts()
    seq_dmc = DMCForward(dmc_model, batch=2, max_len=128)
    par_dmc = DMCForward(dmc_model, batch=2, max_len=128)
    par_dmc.prefill_chunk = 8
    want = seq_dmc.prefill(ids, parallel=False, all_logits=True)
    got, at = [], 0
    for n in splits:
        got.append(par_dmc.prefill(ids[:, at:at + n], parallel=True, all_logits=True))
        at += n
    torch.testing.assert_close(torch.cat(got, dim=1), want, atol=1e-4, rtol=1e-4)
    assert_same_cache(seq_dmc.cache, par_dmc.cache)
    tok = want[:, -1].argmax(-1)
    torch.testing.assert_close(par_dmc.step(tok), seq_dmc.step(tok), atol=1e-4, rtol=1e-4)
    # a next turn after a decoded token
    more = prompts()[:, :7].flip(0)
    torch.testing.assert_close(par_dmc.prefill(more, parallel=True, all_logits=True),
                               seq_dmc.prefill(more, parallel=False, all_logits=True), atol=1e-4, rtol=1e-4)
    assert_same_cache(seq_dmc.cache, par_dmc.cache)


def test_without_merges_dmc_is_plain_attention_without_the_last_dim():
    """DMC zeroes dim D-1 of q and k before RoPE and again after it; a plain model whose
    q/k rows D-1 are zero still rotates dim D/2-1 into D-1. With rows D/2-1 zero as well
    (in both models) the two computations are the same, up to rounding."""
    tensors = zero_rows(tiny_tensors(decisions=False, seed=3), HEAD_DIM // 2 - 1)
    model = build(tensors)
    plain = build(zero_rows(tensors, HEAD_DIM - 1))
    ids = prompts()
    cache = plain.new_cache(64, batch=2)
    want = plain.forward_all(ids, cache, 0)
    for parallel in (False, True):
        dmc = DMCForward(model, batch=2, max_len=64)
        got = dmc.prefill(ids, parallel=parallel, all_logits=True)
        torch.testing.assert_close(got, want, atol=2e-5, rtol=2e-5)
        assert torch.equal(dmc.cache.lens, torch.full_like(dmc.cache.lens, ids.shape[1]))  # no merge anywhere
        tok = want[:, -1].argmax(-1)
        torch.testing.assert_close(dmc.step(tok)[:, None], plain.forward(tok[:, None], cache, ids.shape[1]),
                                   atol=1e-4, rtol=1e-4)
    # and the plain model really differs from the unmodified one: dim D-1 matters there
    full = model.forward_all(ids, model.new_cache(64, batch=2), 0)
    assert not torch.allclose(full, want, atol=1e-3)


def test_stats_count_slots_pages_and_the_dense_equivalent(dmc_model):
    ids = prompts()
    dmc = DMCForward(dmc_model, batch=2, max_len=128)
    empty = dmc.stats()
    assert empty["kv_cache_bytes"] == 0 and empty["kv_cache_bytes_allocated"] == 0 and empty["tokens"] == 0
    dmc.prefill(ids, parallel=False)
    for _ in range(5):
        dmc.step(torch.tensor([1, 2]))
    s = dmc.stats()
    c = dmc.cache
    slot_bytes = 2 * HEAD_DIM * 4  # K and V, float32
    assert s["tokens"] == 45
    assert s["slots"] == int(c.lens.sum()) < 45 * LAYERS * 2 * KV_HEADS
    assert s["kv_cache_bytes"] == s["slots"] * slot_bytes
    assert s["kv_cache_bytes_dense"] == 45 * LAYERS * 2 * KV_HEADS * slot_bytes
    assert s["kv_compression"] == pytest.approx(s["kv_cache_bytes_dense"] / s["kv_cache_bytes"])
    assert s["kv_compression"] > 1.2
    pages_needed = int((-(-c.lens // 16)).sum())
    rows = LAYERS * 2 * KV_HEADS
    assert pages_needed <= c.pages_used <= pages_needed + rows  # on demand: at most one spare per head
    assert s["kv_cache_bytes_allocated"] == c.pages_used * 16 * slot_bytes
    dmc.reset()
    assert dmc.stats()["kv_cache_bytes"] == 0 and dmc.length == 0
    # after a reset the same prompt gives the same logits as a fresh cache
    again = dmc.prefill(ids, parallel=False)
    fresh = DMCForward(dmc_model, batch=2, max_len=128).prefill(ids, parallel=False)
    torch.testing.assert_close(again, fresh)


def test_context_full_is_a_one_line_error(dmc_model):
    dmc = DMCForward(dmc_model, batch=2, max_len=40)
    dmc.prefill(prompts(), parallel=True)
    with pytest.raises(EngineError, match="context full"):
        dmc.step(torch.tensor([1, 2]))


def test_decoding_with_the_triton_kernels_matches_the_references(dmc_model, monkeypatch):
    """The model's DMC step with the Triton update and attention kernels (Triton's interpreter
    on machines without a GPU), on the q/k/v views the step hands them, against the PyTorch
    references."""
    import engine.decoding.dmc as dmc_module
    from kernels.dmc import dmc_decode_attention_triton, dmc_update_triton

    ids = prompts()[:, 3:23]  # the 20-token merge run of row 0, past the window
    ref = DMCForward(dmc_model, batch=2, max_len=32)
    want, want_tokens = greedy(ref, ids, 3, parallel=False)
    longest = []

    def update(*args):
        out = dmc_update_triton(*args)
        longest.append(int(args[9].max()))  # the run lengths, after the update
        return out

    monkeypatch.setattr(dmc_module, "dmc_update", update)
    monkeypatch.setattr(dmc_module, "dmc_decode_attention", dmc_decode_attention_triton)
    tri = DMCForward(dmc_model, batch=2, max_len=32)
    got, tokens = greedy(tri, ids, 3, parallel=False)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    assert torch.equal(tokens, want_tokens)
    assert torch.equal(tri.cache.lens, ref.cache.lens) and max(longest) > 12


# ---- a Medusa tree over the DMC cache --------------------------------------------------------
TREE_CHOICES = [[0], [1], [2], [0, 0], [0, 1], [1, 0], [2, 0], [0, 0, 0], [0, 0, 1], [0, 1, 0], [1, 0, 0],
                [0, 0, 0, 0], [0, 0, 1, 0], [1, 0, 0, 0], [0, 0, 0, 0, 0]]


def tree_tokens(n: int, seed: int) -> torch.Tensor:
    """Node tokens, most with bit 0 set (layer 0, KV head 0 merges), so that runs along the paths
    merge, append and cross the window."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, VOCAB, (n,), generator=g)
    return torch.where(torch.rand(n, generator=g) < 0.7, tokens | 1, tokens)


def path_of(tree, node: int) -> list[int]:
    path = [node]
    while path[-1] != 0:
        path.append(int(tree.parents[path[-1]]))
    return path[::-1]


@pytest.mark.parametrize("slots", ["cpu kernel", "pytorch"])
@pytest.mark.parametrize("held, seed", [(1, 0), (18, 1), (23, 2), (40, 3)])
def test_a_tree_over_the_dmc_cache_sees_what_sequential_decoding_would(dmc_model, held, seed, slots, monkeypatch):
    """Every node's logits are those of stepping its root-to-node path token by token; the
    accepted path's commit leaves the cache as those steps do (held=18: in row 0's 20-token merge
    run, 15 tokens in, past the window). The nodes' slots from the C++ kernel and from PyTorch
    operations."""
    import engine.decoding.dmc as dmc_module
    from engine.decoding.medusa.tree import build_tree
    from kernels import cpu_ops

    if slots == "cpu kernel" and not cpu_ops.available():
        pytest.skip(f"CPU kernels: {cpu_ops.why_not()}")
    if slots == "pytorch":
        monkeypatch.setattr(dmc_module, "use_cpu_tree_slots", lambda device, dtype: False)

    tree = build_tree(TREE_CHOICES)
    prompt = prompts()[:1, :held]
    tokens = tree_tokens(tree.num_nodes, seed)
    dmc = DMCForward(dmc_model, batch=1, max_len=128)
    dmc.prefill(prompt)
    hidden = dmc.tree_hidden(tokens[None], tree.parents, tree.position_offsets)
    got = dmc_model.logits(hidden)
    for node in range(tree.num_nodes):
        seq = DMCForward(dmc_model, batch=1, max_len=128)
        seq.prefill(prompt, parallel=False)
        for tok in tokens[path_of(tree, node)]:
            want = seq.step(tok[None])[0]
        torch.testing.assert_close(got[node], want, atol=2e-4, rtol=2e-4, msg=f"node {node}")
    for leaf in (14, 12, 9):
        path = path_of(tree, leaf)
        a, b = DMCForward(dmc_model, batch=1, max_len=128), DMCForward(dmc_model, batch=1, max_len=128)
        a.prefill(prompt)
        a.tree_hidden(tokens[None], tree.parents, tree.position_offsets)
        a.commit(torch.tensor(path))
        b.prefill(prompt, parallel=False)
        for tok in tokens[path]:
            b.step(tok[None])
        assert_same_cache(b.cache, a.cache)
        nxt = torch.tensor([7])
        torch.testing.assert_close(a.step(nxt), b.step(nxt), atol=2e-4, rtol=2e-4)


def test_the_fp8_calibration_pass_is_dmc_decoding_one_layer_at_a_time(dmc_model):
    """FP8 calibration with DMC carries its text through one layer at a time as DMC decodes it:
    all layers in turn give the parallel prefill's hidden states (and not dense attention's)."""
    from engine.decoding.dmc import calibration_pass

    ids = prompts()
    run = calibration_pass({"init_val": 5.0, "window": 12})(dmc_model, ids.shape[0], ids.shape[1])
    x = F.embedding(ids, dmc_model.embed)
    with torch.inference_mode():
        for li, layer in enumerate(dmc_model.layers):
            y = run(li, layer, x)
            # calibration passes each layer twice (recording, then quantized): the same each time
            torch.testing.assert_close(run(li, layer, x), y, atol=0, rtol=0)
            x = y
        want = DMCForward(dmc_model, batch=ids.shape[0], max_len=ids.shape[1]).prefill(ids, all_logits=True)
        dense = dmc_model.forward_all(ids, dmc_model.new_cache(ids.shape[1], batch=ids.shape[0]), 0)
    got = dmc_model.logits(dmc_model.final_norm(x))
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert (got - dense).abs().max() > 1e-2  # the merges change what the layers see
