"""training/medusa.py: the batched greedy decoders that make the self-distillation replies and
the replies an acceptance profile is measured on, the profile over a DMC cache, and the prompts."""

import json
import shutil
from pathlib import Path

import torch

from engine.decoding.medusa.heads import Profile
from engine.events import LoadModel, SamplingParams
from engine.paths import ASSETS
from engine.session import Session
from training.medusa import dmc_greedy_batch, greedy_batch, profile_over
from training.prompts import PROFILE_REQUESTS, PROFILE_TOPICS, everyday_prompts, profile_prompts, training_prompts

ROOT = Path(__file__).resolve().parents[2]


def single_greedy(model, prompt, n, eos_ids):
    cache = model.new_cache(len(prompt) + n)
    out = []
    with torch.inference_mode():
        logits = model.forward(torch.tensor([prompt]), cache, 0)[0, -1]
        for _ in range(n):
            out.append(int(logits.argmax()))
            if out[-1] in eos_ids:
                break
            logits = model.forward(torch.tensor([[out[-1]]]), cache, cache.length)[0, -1]
    return out


def test_batched_replies_equal_one_at_a_time_greedy(embedded_session):
    """Prompts of one length decoded together give each prompt's own greedy reply, also after
    rows have left the batch at their EOS (a tiny EOS set makes them leave early)."""
    model, tok = embedded_session.model, embedded_session.tokenizer
    texts = ["What is 7 times 8?", "What is 9 times 3?", "What is 4 times 6?", "What is 5 times 5?"]
    prompts = [tok.encode_chat([{"role": "user", "content": t}]) for t in texts]
    assert len({len(p) for p in prompts}) == 1
    eos = set(tok.eos_ids)
    first = single_greedy(model, prompts[1], 12, eos)
    eos.add(first[5])  # row 1 (at least) stops early
    got = greedy_batch(model, prompts, 12, eos)
    for p, reply in zip(prompts, got):
        assert reply == single_greedy(model, p, 12, eos)
    assert len(got[1]) <= 6


def test_training_prompts_are_distinct_and_keep_out_the_benchmark_prompts():
    every = training_prompts()
    assert len(every) == len(set(every)) > 5000
    assert set(everyday_prompts()) <= set(every)
    bench = set((ROOT / "bench" / "data" / "chat_prompts.txt").read_text().splitlines())
    assert not bench & set(every)
    assert training_prompts(10) == every[:10]


def test_profile_prompts_are_on_subjects_no_training_or_benchmark_prompt_has():
    every = profile_prompts()
    assert len(every) == len(set(every)) >= 240 and profile_prompts(5) == every[:5]
    training = " ".join(training_prompts()).lower()
    bench = (ROOT / "bench" / "data" / "chat_prompts.txt").read_text().lower()
    for subject in PROFILE_TOPICS + [x for _, slots in PROFILE_REQUESTS for x in slots]:
        assert subject.lower() not in training and subject.lower() not in bench, subject


def test_batched_dmc_replies_equal_dmc_greedy_decoding(embedded_session):
    """The profile over a DMC cache is measured on the DMC model's own greedy replies: decoded
    together, each prompt's reply is what DMC decoding of it alone gives."""
    dmc = Session.load(LoadModel(device="cpu", decoding="dmc"))
    tok, settings = dmc.tokenizer, {"init_val": dmc.decoder.dmc.init_val, "window": dmc.decoder.dmc.window}
    texts = ["What is 7 times 8?", "What is 9 times 3?", "What is 4 times 6?"]
    prompts = [tok.encode_chat([{"role": "user", "content": t}]) for t in texts]
    got = dmc_greedy_batch(dmc.model, settings, prompts, 10, set(tok.eos_ids))
    for t, reply in zip(texts, got):
        dmc.reset()
        want = list(dmc.generate([{"role": "user", "content": t}], SamplingParams(max_new_tokens=10)))[-1].stats
        assert reply[:len(want.token_ids)] == want.token_ids and len(reply) >= len(want.token_ids)


def test_profile_over_the_dmc_cache_is_added_to_the_heads_file(tmp_path, embedded_session):
    name = embedded_session.name
    for suffix in (".json", ".safetensors"):
        shutil.copy(ASSETS / "medusa" / f"{name}{suffix}", tmp_path / f"{name}{suffix}")
    entry = profile_over("dmc", None, "cpu", 3, 12, 4, tmp_path)
    meta = json.loads((tmp_path / f"{name}.json").read_text())
    assert meta["profiles"]["dmc"] == entry and meta["profile"]  # the training profile stays
    assert entry["prompts"] == 3 and entry["engine_agreement"] > 0.9
    paths = [tuple(e["path"]) for e in entry["profile"]]
    freq = dict(zip(paths, (e["freq"] for e in entry["profile"])))
    assert all(0 < f <= 1 for f in freq.values())
    assert all(p[:-1] == () or freq[p[:-1]] >= freq[p] for p in paths)  # a path is never likelier than its parent
    profile = Profile.read(tmp_path / f"{name}.json", "dmc")
    assert profile.paths == [(p, freq[p]) for p in paths]
