"""training/medusa.py: the batched greedy decoder that makes the self-distillation replies, and
the training prompts."""

from pathlib import Path

import torch

from training.medusa import greedy_batch
from training.prompts import everyday_prompts, training_prompts

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
