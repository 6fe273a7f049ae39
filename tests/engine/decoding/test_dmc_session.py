"""DMC decoding through the engine: a tiny Hugging Face checkpoint (the embedded model's
tokenizer) whose DMC retrofit delta wires the decision neurons to token parity (k[D-1] of every
key head is 50 x a feature that is +1 for odd tokens), so roughly every other token merges.
`chatapp run --decoding dmc --json` reports the compression and produces DMCForward's own greedy
continuation; Session reuses the DMC state for the next turn of a chat; a model without DMC and
broken deltas are refused."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from engine.decoding.dmc import DMCForward
from engine.formats.dmc_delta import delta_metadata
from engine.hub.layout import LOCAL_DMC_DELTA as LOCAL_NAME
from engine.model.weights import load_retrofitted
from engine.errors import EngineError
from engine.events import LoadModel, SamplingParams, Step
from engine.session import Session
from engine.model.weights import from_megatron
from fakes.checkpoints import write_tiny_checkpoint

ROOT = Path(__file__).resolve().parents[3]
D = 16  # head_dim of the tiny checkpoint (64 hidden / 4 heads)


@pytest.fixture(scope="module")
def dmc_checkpoint(tmp_path_factory, embedded_session):
    """The tiny checkpoint, with feature 0 of each token's embedding = +-1 by parity and kept out
    of every residual write, and a delta with decision rows that read it."""
    path = write_tiny_checkpoint(tmp_path_factory.mktemp("dmc") / "tiny-dmc", embedded_session.path)
    weights = load_file(str(path / "model.safetensors"))
    vocab = weights["model.embed_tokens.weight"].shape[0]
    weights["model.embed_tokens.weight"][:, 0] = (torch.arange(vocab) % 2).float() * 2 - 1
    delta = {}
    for li in range(2):
        p = f"model.layers.{li}."
        weights[p + "self_attn.o_proj.weight"][0] = 0
        weights[p + "mlp.down_proj.weight"][0] = 0
        k_rows = torch.zeros(2, 64)
        k_rows[:, 0] = 50.0
        q_rows = torch.zeros(4, 64)
        q_rows[:, 0] = -2.0  # weights sigmoid(+-2 + 5): not all equal
        delta[p + "self_attn.k_proj.decision_rows"] = k_rows
        delta[p + "self_attn.q_proj.decision_rows"] = q_rows
    save_file(weights, str(path / "model.safetensors"), metadata={"format": "pt"})
    (path / LOCAL_NAME).parent.mkdir()
    from engine.config import load_config

    save_file(delta, str(path / LOCAL_NAME), metadata=delta_metadata(load_config(path), path.name, 5.0, 12))
    return path


def own_greedy(path: Path, prompt: list[int], n: int) -> list[int]:
    model, settings = load_retrofitted(path, path / LOCAL_NAME, "cpu")
    dmc = DMCForward(model, 1, 512, **settings)
    logits = dmc.prefill(torch.tensor([prompt]))
    out = []
    for _ in range(n):
        tok = int(logits[0].argmax())
        out.append(tok)
        logits = dmc.step(torch.tensor([tok]))
    return out


@pytest.mark.slow
def test_run_dmc_json_reports_compression_and_matches_the_decoder(dmc_checkpoint):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "chatapp", "run", "--model", str(dmc_checkpoint), "--device", "cpu",
                        "--decoding", "dmc", "--json", "--prompt", "Count to ten.", "--max-new-tokens", "24",
                        "--ignore-eos"], capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    stats = json.loads(r.stdout)
    assert stats["decoding"] == "dmc" and stats["n_generated"] == 24
    assert stats["kv_compression"] > 1.3
    assert stats["kv_cache_bytes_dense"] == pytest.approx(stats["kv_cache_bytes"] * stats["kv_compression"])
    session = Session.load(LoadModel(str(dmc_checkpoint), "cpu"))
    prompt = session.tokenizer.encode_chat([{"role": "user", "content": "Count to ten."}])
    # a dense cache for prompt + 23 fed tokens: 2 layers x 2 KV heads x 16 dims x K,V x 4 bytes
    assert stats["kv_cache_bytes_dense"] == (len(prompt) + 23) * 2 * 2 * D * 2 * 4
    assert stats["token_ids"] == own_greedy(dmc_checkpoint, prompt, 24)


def test_plain_decoding_reports_the_dense_cache(dmc_checkpoint):
    session = Session.load(LoadModel(str(dmc_checkpoint), "cpu"))
    events = list(session.generate([{"role": "user", "content": "Hi"}], SamplingParams(max_new_tokens=5,
                                                                                       ignore_eos=True)))
    stats = events[-1].stats
    assert stats.kv_compression == 1.0 and stats.kv_cache_bytes == stats.kv_cache_bytes_dense > 0
    assert all(e.kv_bytes == e.kv_bytes_dense for e in events if isinstance(e, Step))


def test_session_dmc_steps_second_turn_and_sampling(dmc_checkpoint):
    session = Session.load(LoadModel(str(dmc_checkpoint), "cpu", decoding="dmc"))
    assert session.decoding == "dmc" and not hasattr(session.decoder, "cache") and session.info().decoding == "dmc"
    chat = [{"role": "user", "content": "Say something."}]
    events = list(session.generate(chat, SamplingParams(max_new_tokens=10, ignore_eos=True)))
    steps = [e for e in events if isinstance(e, Step)]
    assert len(steps) == 10 and all(s.kv_bytes_dense > s.kv_bytes > 0 for s in steps[1:])
    assert [s.kv_bytes_dense for s in steps] == sorted(s.kv_bytes_dense for s in steps)
    first = events[-1].stats
    # the next turn starts with the whole first exchange (the held tokens, the reply's last one
    # and new ones): the DMC state is reused and only the new tokens are prefilled
    prompt = session.tokenizer.encode_chat(chat) + first.token_ids + session.tokenizer.encode("\nMore.")
    assert session.decoder.cached_ids == prompt[:len(session.decoder.cached_ids)]
    fed = []
    prefill = session.decoder.dmc.prefill
    session.decoder.dmc.prefill = lambda ids, **kw: fed.append(ids.shape[1]) or prefill(ids, **kw)
    second = list(session.generate_ids(prompt, SamplingParams(max_new_tokens=8, ignore_eos=True)))[-1]
    assert fed == [len(prompt) - len(session.tokenizer.encode_chat(chat)) - 9]
    assert second.stats.token_ids == own_greedy(dmc_checkpoint, prompt, 8)
    # a prompt that is not a continuation starts over
    third = list(session.generate_ids(prompt[:20], SamplingParams(max_new_tokens=4, ignore_eos=True)))[-1]
    assert fed[-1] == 20 and third.stats.token_ids == own_greedy(dmc_checkpoint, prompt[:20], 4)
    session.decoder.dmc.prefill = prefill
    # sampling goes through the Sampler: a seed repeats, and tokens differ from greedy somewhere
    sample = SamplingParams(max_new_tokens=12, temperature=1.5, seed=3, ignore_eos=True)
    a = [e for e in session.generate(chat[:1], sample)][-1].stats.token_ids
    b = [e for e in session.generate(chat[:1], sample)][-1].stats.token_ids
    assert a == b and a != own_greedy(dmc_checkpoint, session.tokenizer.encode_chat(chat[:1]), 12)


def test_models_without_dmc_and_bad_deltas_are_refused(dmc_checkpoint, tiny_checkpoint, tmp_path):
    with pytest.raises(EngineError, match="no DMC for this model"):
        Session.load(LoadModel(str(tiny_checkpoint), "cpu", decoding="dmc"))
    from engine.config import load_config

    cfg = load_config(dmc_checkpoint)
    good = load_file(str(dmc_checkpoint / LOCAL_NAME))
    meta = delta_metadata(cfg, "tiny", 5.0, 12)
    cases = {
        "shape": ({**good, "model.layers.0.self_attn.k_proj.decision_rows": torch.zeros(3, 64)}, meta,
                  r"k_proj.decision_rows' has shape \[3, 64\], expected \[2, 64\]"),
        "missing": ({k: v for k, v in good.items() if not k.startswith("model.layers.1.self_attn.q")}, meta,
                    "no decision rows for model.layers.1.self_attn.q_proj.weight"),
        "unknown": ({**good, "model.layers.0.self_attn.x_proj.weight": torch.zeros(2)}, meta,
                    "x_proj.weight' is not in the base checkpoint"),
        "config": (good, {**meta, "num_layers": "30"}, "made for a model with num_layers=30"),
        "half low-rank": ({**good, "model.layers.0.self_attn.v_proj.weight.lora_a": torch.zeros(4, 64)}, meta,
                          "v_proj.weight has only one of lora_a, lora_b"),
        "low-rank shape": ({**good, "model.layers.0.self_attn.v_proj.weight.lora_a": torch.zeros(4, 64),
                            "model.layers.0.self_attn.v_proj.weight.lora_b": torch.zeros(64, 4)}, meta,
                           r"do not make a \[32, 64\] update"),
        "format": (good, {}, "not a DMC delta"),
    }
    for name, (tensors, metadata, message) in cases.items():
        bad = tmp_path / f"{name}.safetensors"
        save_file(tensors, str(bad), metadata=metadata)
        with pytest.raises(EngineError, match=message):
            load_retrofitted(dmc_checkpoint, bad, "cpu")
    # a whole replaced tensor is applied
    o = torch.full((64, 64), 0.01)
    whole = tmp_path / "whole.safetensors"
    save_file({**good, "model.layers.1.self_attn.o_proj.weight": o}, str(whole), metadata=meta)
    model, _ = load_retrofitted(dmc_checkpoint, whole, "cpu")
    x = torch.randn(1, 1, 64)
    assert torch.allclose(model.layers[1].o(x), x @ o.t(), atol=1e-6)


def megatron_dmc(dmc_checkpoint, folder, megatron_writer):
    """The DMC checkpoint's weights (decision rows included) as a legacy Megatron checkpoint."""
    from fakes.megatron import write_megatron

    w = load_file(str(dmc_checkpoint / "model.safetensors"))
    for name, rows in load_file(str(dmc_checkpoint / LOCAL_NAME)).items():
        target = name.replace(".decision_rows", ".weight")
        w[target][torch.arange(rows.shape[0]) * D + D - 1] = rows
    w["lm_head.weight"] = w["model.embed_tokens.weight"].clone()
    return write_megatron(folder, w, megatron_writer, padded_vocab_size=49152, ffn_hidden_size=128,
                          max_position_embeddings=512, seq_length=512, dmc_init_val=5.0)


def test_megatron_dmc_checkpoint(dmc_checkpoint, tmp_path, fake_megatron):
    """A legacy Megatron checkpoint with the decision rows in its weights decodes with DMC, the
    settings from its stored args; its tokenizer files are looked for next to it."""
    import shutil

    from fakes.checkpoints import TOKENIZER_FILES

    root = megatron_dmc(dmc_checkpoint, tmp_path / "meg", fake_megatron)
    with pytest.raises(EngineError, match="no tokenizer.model: Megatron checkpoints do not include their tokenizer; "
                                          "put the Llama 2 SentencePiece tokenizer.model .* or give its path with "
                                          "--tokenizer PATH"):
        Session.load(LoadModel(str(root), "cpu", decoding="dmc"))
    for name in TOKENIZER_FILES:
        if (dmc_checkpoint / name).exists():
            shutil.copy(dmc_checkpoint / name, root / name)
    session = Session.load(LoadModel(str(root), "cpu", decoding="dmc"))
    chat = [{"role": "user", "content": "Count to ten."}]
    stats = list(session.generate(chat, SamplingParams(max_new_tokens=12, ignore_eos=True)))[-1].stats
    assert stats.decoding == "dmc" and stats.kv_compression > 1.3
    dmc = DMCForward(from_megatron(root, "cpu", torch.float32), 1, 512)
    logits = dmc.prefill(torch.tensor([session.tokenizer.encode_chat(chat)]))
    own = []
    for _ in range(12):
        own.append(int(logits[0].argmax()))
        logits = dmc.step(torch.tensor([own[-1]]))
    assert stats.token_ids == own
    # lookup drafts verified over the DMC cache: DMC's own greedy output, fewer steps
    lookup = Session.load(LoadModel(str(root), "cpu", decoding="lookup+dmc"))
    params = SamplingParams(max_new_tokens=40, ignore_eos=True)
    session.reset()
    want, got = (list(s.generate(chat, params))[-1].stats for s in (session, lookup))
    assert got.decoding == "lookup+dmc" and got.token_ids == want.token_ids and got.steps < want.steps


def llama2_style_sentencepiece(folder) -> Path:
    """A small SentencePiece BPE model trained by the official library with the Llama 2
    tokenizer's settings (byte fallback, split digits, identity normalization, whitespace kept)."""
    import sentencepiece as spm
    from pydoc_data.topics import topics

    folder.mkdir(parents=True, exist_ok=True)
    text = folder / "corpus.txt"
    text.write_text("\n".join(topics[k] for k in sorted(topics))[:60000])
    spm.SentencePieceTrainer.train(input=str(text), model_prefix=str(folder / "tokenizer"), vocab_size=500,
                                   model_type="bpe", byte_fallback=True, split_digits=True, unk_id=0, bos_id=1,
                                   eos_id=2, pad_id=-1, normalization_rule_name="identity",
                                   remove_extra_whitespaces=False, add_dummy_prefix=True, character_coverage=0.9995,
                                   minloglevel=2)
    return folder / "tokenizer.model"


def test_megatron_checkpoint_with_a_sentencepiece_tokenizer(dmc_checkpoint, tmp_path, fake_megatron, monkeypatch):
    """The Llama 2 tokenizer.model next to the checkpoint, or given with --tokenizer, is converted
    once (cached) and encodes as SentencePiece does; a file that is not one is named."""
    import sentencepiece as spm

    monkeypatch.setenv("CHATAPP_CACHE_DIR", str(tmp_path / "cache"))
    model_file = llama2_style_sentencepiece(tmp_path / "spm")
    sp = spm.SentencePieceProcessor(model_file=str(model_file))
    root = megatron_dmc(dmc_checkpoint, tmp_path / "meg", fake_megatron)

    session = Session.load(LoadModel(str(root), "cpu", decoding="dmc", tokenizer=str(model_file)))
    for text in ("The quick brown fox jumps over the lazy dog.", "def f(x):\n    return x ** 2  # 12345",
                 "Naïve café, déjà vu: 日本語 🙂"):
        assert session.tokenizer.raw.encode(text, add_special_tokens=False).ids == sp.encode(text)
        assert session.tokenizer.decode(sp.encode(text)) == text
    stats = list(session.generate([{"role": "user", "content": "Count to ten."}],
                                  SamplingParams(max_new_tokens=6, ignore_eos=True)))[-1].stats
    assert stats.decoding == "dmc" and stats.n_generated == 6
    assert len(list((tmp_path / "cache" / "tokenizers").iterdir())) == 1

    (root / "tokenizer.model").write_bytes(model_file.read_bytes())  # next to the checkpoint
    again = Session.load(LoadModel(str(root), "cpu", decoding="dmc"))
    assert again.tokenizer.raw.encode("Hello there").ids == session.tokenizer.raw.encode("Hello there").ids
    assert len(list((tmp_path / "cache" / "tokenizers").iterdir())) == 1  # the same conversion, cached

    bad = tmp_path / "bad.model"
    bad.write_bytes(b"\x00not a sentencepiece model" * 10)
    with pytest.raises(EngineError, match=f"{bad}: not a SentencePiece tokenizer model"):
        Session.load(LoadModel(str(root), "cpu", decoding="dmc", tokenizer=str(bad)))
    with pytest.raises(EngineError, match="tokenizer file not found"):
        Session.load(LoadModel(str(root), "cpu", decoding="dmc", tokenizer=str(tmp_path / "missing.model")))


def test_dmc_with_fp8_calibrates_through_the_dmc_cache(dmc_checkpoint, tmp_path, monkeypatch):
    """``--decoding dmc --quantize fp8``: the FP8 layers are calibrated on DMC's layer inputs (a
    cache file of their own, apart from the dense calibration of the same checkpoint), then it
    decodes, with the cache compressed."""
    import engine.decoding.dmc as dmc_module
    import engine.model.gptq as gptq
    from engine.model.linear import Fp8Linear

    monkeypatch.setenv("CHATAPP_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(gptq, "SAMPLES", 4)
    monkeypatch.setattr(gptq, "LENGTH", 24)
    passes = []
    real = dmc_module.DMCForward.layer_prefill
    monkeypatch.setattr(dmc_module.DMCForward, "layer_prefill",
                        lambda self, li, layer, x: passes.append(li) or real(self, li, layer, x))
    session = Session.load(LoadModel(str(dmc_checkpoint), "cpu", decoding="dmc", quantize="fp8"))
    assert passes[:4] == [0, 0, 1, 1]  # each layer: recorded, then run quantized, through DMC
    assert all(isinstance(ly.qkv, Fp8Linear) for ly in session.model.layers)
    [dmc_file] = (tmp_path / "cache" / "fp8").glob("*.safetensors")
    Session.load(LoadModel(str(dmc_checkpoint), "cpu", quantize="fp8"))  # dense: calibrated apart
    assert len(list((tmp_path / "cache" / "fp8").glob("*.safetensors"))) == 2
    from safetensors import safe_open

    with safe_open(str(dmc_file), framework="pt") as f:
        assert f.metadata()["pass"] == "dmc 5.0 12"
    stats = list(session.generate([{"role": "user", "content": "Count to ten."}],
                                  SamplingParams(max_new_tokens=12, ignore_eos=True)))[-1].stats
    assert stats.n_generated == 12 and stats.kv_compression > 1.2
