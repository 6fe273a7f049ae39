"""training/dmc.py on a tiny checkpoint: its training-time DMC forward (partial accumulations and
the log(1 - alpha) mask) with hard decisions equals the engine's DMCForward, its dense forward
equals LlamaModel; a few steps of the script write a delta the engine loads strictly and decodes
with, and a report with the held-out figures."""

import json
import math

import pytest
import torch
from safetensors.torch import load_file, save_file

from engine.decoding.dmc import DMCForward
from engine.formats.dmc_delta import ROWS
from engine.model.weights import from_dir, load_retrofitted
from fakes.checkpoints import write_tiny_checkpoint
from training import dmc as train_dmc


@pytest.fixture(scope="module")
def forced(tmp_path_factory, embedded_session):
    """The tiny checkpoint with k[D-1] of every key head = 50 x a +-1 parity feature of the token
    (kept out of every residual write): a merge after every odd token."""
    path = write_tiny_checkpoint(tmp_path_factory.mktemp("dmct") / "tiny", embedded_session.path)
    w = load_file(str(path / "model.safetensors"))
    vocab = w["model.embed_tokens.weight"].shape[0]
    w["model.embed_tokens.weight"][:, 0] = (torch.arange(vocab) % 2).float() * 2 - 1
    for li in range(2):
        p = f"model.layers.{li}."
        w[p + "self_attn.o_proj.weight"][0] = 0
        w[p + "mlp.down_proj.weight"][0] = 0
        for kvh in range(2):
            w[p + "self_attn.k_proj.weight"][kvh * 16 + 15] = 0
            w[p + "self_attn.k_proj.weight"][kvh * 16 + 15, 0] = 50.0
    save_file(w, str(path / "model.safetensors"), metadata={"format": "pt"})
    return path


def test_training_forward_equals_the_engine(forced):
    rf = train_dmc.Retrofit(forced, "cpu", "decision", 5.0, 12, 0.1)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 49152, (2, 40), generator=g)
    ids[0, 5:25] |= 1  # a 20-token merge run: past the 12-token window
    model = from_dir(forced, "cpu", dtype=torch.float32)
    with torch.no_grad():
        dense, _ = rf.forward(ids, "dense")
        student, decisions = rf.forward(ids, "dmc", noise=False)
    plain = model.forward_all(ids, model.new_cache(64, batch=2), 0)
    assert torch.allclose(dense, plain, atol=1e-4)
    dmc = DMCForward(model, 2, 64)
    ref = dmc.prefill(ids, all_logits=True)
    assert torch.allclose(student, ref, atol=1e-4)
    assert not torch.allclose(student, dense, atol=1e-2)  # the merges change the outputs
    share = ((ids[:, 1:] % 2) == 1).float().mean()
    assert all(abs(float(d[:, 1:].mean()) - share) < 1e-6 and not d[:, 0].any() for d in decisions)


@pytest.mark.parametrize("train", ["decision", "lora", "attention"])
def test_script_writes_a_delta_the_engine_loads(forced, tmp_path, monkeypatch, embedded_session, train):
    monkeypatch.setenv("CHATAPP_CACHE_DIR", str(tmp_path / "cache"))
    from engine.tokenizer import ChatTokenizer

    tok = ChatTokenizer(forced, from_dir(forced, "cpu").cfg)
    replies = tmp_path / "replies.jsonl"
    with replies.open("w") as f:
        for n in range(6):
            prompt = tok.encode_chat([{"role": "user", "content": f"Question number {n}?"}])
            f.write(json.dumps({"prompt": str(n), "prompt_ids": prompt,
                                "reply_ids": tok.encode(f"Answer {n}: " + "la " * (5 + n))}) + "\n")
    text = tmp_path / "text.txt"
    text.write_text("The lighthouse stood at the end of a narrow spit of land. " * 12)
    out = tmp_path / "out"
    rc = train_dmc.main(["--model", str(forced), "--replies", str(replies), "--text", str(text), "--train", train,
                         "--stage1-steps", "2", "--steps", "3", "--batch", "2", "--seq-len", "48", "--holdout", "0.34",
                         "--out", str(out)])
    assert rc == 0
    delta = load_file(str(out / "tiny.safetensors"))
    rows = {f"model.layers.{li}.self_attn.{p}{ROWS}" for li in range(2) for p in ("q_proj", "k_proj")}
    if train == "decision":
        assert set(delta) == rows and delta["model.layers.0.self_attn.k_proj" + ROWS].shape == (2, 64)
    elif train == "lora":
        assert set(delta) == rows | {f"model.layers.{li}.self_attn.{p}_proj.weight.lora_{ab}" for li in range(2)
                                     for p in "qkvo" for ab in "ab"}
        assert delta["model.layers.1.self_attn.o_proj.weight.lora_b"].abs().max() > 0  # trained
    else:
        assert len(delta) == 8 and all(t.dtype == torch.bfloat16 for t in delta.values())
    report = json.loads((out / "tiny.json").read_text())
    assert report["training"]["stage2_steps"] == 3 and report["training"]["held_out_replies"] == 2
    assert report["training"]["stage1_steps"] == (0 if train == "decision" else 2)
    held = report["held_out"]
    assert held["chats"] == 2 and held["kv_compression"] >= 1.0
    assert math.isfinite(held["perplexity_original"]) and math.isfinite(held["perplexity_dmc"])
    assert len(report["history"]) == 2  # steps 0 and 2
    model, settings = load_retrofitted(forced, out / "tiny.safetensors", "cpu")
    assert settings == {"init_val": 5.0, "window": 12}
    if train == "lora":  # the engine applies W + B A
        base = load_file(str(forced / "model.safetensors"))
        name = "model.layers.1.self_attn.o_proj.weight"
        w = base[name] + delta[name + ".lora_b"] @ delta[name + ".lora_a"]
        x = torch.randn(1, 1, 64)
        assert torch.allclose(model.layers[1].o(x), x @ w.t(), atol=1e-5)
    dec = DMCForward(model, 1, 64, **settings)
    logits = dec.step(dec.prefill(torch.tensor([[5, 7, 9, 11]]))[0].argmax().view(1))
    assert logits.shape == (1, 49152) and torch.isfinite(logits).all() and dec.length == 5


def test_a_stopped_run_resumes_where_it_stopped(forced, tmp_path, monkeypatch):
    """A run stopped in stage 2 and resumed with --resume writes the same delta as one run through."""
    monkeypatch.setenv("CHATAPP_CACHE_DIR", str(tmp_path / "cache"))
    text = tmp_path / "text.txt"
    text.write_text("The lighthouse stood at the end of a narrow spit of land. " * 12)
    args = ["--model", str(forced), "--replies", str(tmp_path / "none.jsonl"), "--text", str(text), "--train", "lora",
            "--stage1-steps", "2", "--steps", "3", "--batch", "2", "--seq-len", "24", "--save-every", "1",
            "--eval-chats", "0"]
    assert train_dmc.main(args + ["--out", str(tmp_path / "whole")]) == 0
    state = tmp_path / "cache" / "training" / "tiny-dmc-state.pt"
    assert not state.exists()  # removed when a run completes

    real_step, calls = train_dmc.train_step, []

    def stopping_step(*a, **k):
        calls.append(1)
        if len(calls) == 5:  # stage 1's two steps, stage 2's steps 0 and 1 ran and were saved
            raise KeyboardInterrupt
        return real_step(*a, **k)

    monkeypatch.setattr(train_dmc, "train_step", stopping_step)
    with pytest.raises(KeyboardInterrupt):
        train_dmc.main(args + ["--out", str(tmp_path / "stopped")])
    assert state.exists() and not (tmp_path / "stopped" / "tiny.safetensors").exists()
    monkeypatch.setattr(train_dmc, "train_step", lambda *a, **k: pytest.fail("trained"))
    assert train_dmc.main(args + ["--evaluate-state", "--out", str(tmp_path / "so-far")]) == 0
    report = json.loads((tmp_path / "so-far" / "tiny.json").read_text())
    assert report["training"]["stage2_steps_done"] == 2 and state.exists()
    assert math.isfinite(report["held_out"]["perplexity_dmc"])
    monkeypatch.setattr(train_dmc, "train_step", real_step)
    with pytest.raises(SystemExit, match="other settings"):
        train_dmc.main(args + ["--cr", "3", "--resume", "--out", str(tmp_path / "stopped")])
    assert train_dmc.main(args + ["--resume", "--out", str(tmp_path / "stopped")]) == 0
    whole, resumed = (load_file(str(tmp_path / d / "tiny.safetensors")) for d in ("whole", "stopped"))
    assert set(whole) == set(resumed)
    assert all(torch.equal(whole[k], resumed[k]) for k in whole)


def test_init_starts_stage_2_from_an_earlier_delta(forced, tmp_path, monkeypatch):
    """--init: no stage 1; stage 2's first step sees the earlier delta's tensors; a delta of another
    kind is refused."""
    monkeypatch.setenv("CHATAPP_CACHE_DIR", str(tmp_path / "cache"))
    text = tmp_path / "text.txt"
    text.write_text("The lighthouse stood at the end of a narrow spit of land. " * 12)
    args = ["--model", str(forced), "--replies", str(tmp_path / "none.jsonl"), "--text", str(text), "--train", "lora",
            "--stage1-steps", "2", "--steps", "2", "--batch", "2", "--seq-len", "24", "--eval-chats", "0"]
    assert train_dmc.main(args + ["--out", str(tmp_path / "first")]) == 0
    first = load_file(str(tmp_path / "first" / "tiny.safetensors"))
    real_step, seen = train_dmc.train_step, []

    def checking_step(rf, *a, **k):
        if not seen:
            seen.append({n: t.clone() for n, t in rf.delta("lora").items()})
        return real_step(rf, *a, **k)

    monkeypatch.setattr(train_dmc, "train_step", checking_step)
    assert train_dmc.main(args + ["--init", str(tmp_path / "first" / "tiny.safetensors"), "--cr", "1.5", "--anneal",
                                  "0", "--out", str(tmp_path / "second")]) == 0
    assert set(seen[0]) == set(first)
    assert [n for n in first if not torch.equal(seen[0][n], first[n])] == []
    report = json.loads((tmp_path / "second" / "tiny.json").read_text())
    assert report["training"]["stage1_steps"] == 0 and report["training"]["init"].endswith("tiny.safetensors")
    assert report["history"][0]["cr_target"] == 1.5  # held from step 0
    with pytest.raises(SystemExit, match="--train decision"):
        train_dmc.main([*args[:6], "--train", "decision", "--steps", "1", "--batch", "2", "--seq-len", "24",
                        "--eval-chats", "0", "--init", str(tmp_path / "first" / "tiny.safetensors"),
                        "--out", str(tmp_path / "third")])
