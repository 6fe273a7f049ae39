"""The engine's CUDA-only paths, where there is a CUDA GPU (bench/gpu_run.sh runs them; skipped
elsewhere): the decode step and the Medusa verify pass replayed as CUDA graphs equal their eager
passes, the stats' VRAM figure is torch's, a model switch gives its memory back, and greedy
output on the GPU (bf16) follows the CPU's (fp32) on the embedded model."""

import gc
import threading
from pathlib import Path

import pytest
import torch

from engine.config import config_from_dict
from engine.formats.random_weights import RandomSource
from engine.model.weights import from_source

pytestmark = pytest.mark.cuda

CUDA = torch.device("cuda")
SMALL = dict(model_type="llama", hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=8,
             num_key_value_heads=2, vocab_size=1024, max_position_embeddings=4096, rms_norm_eps=1e-5,
             rope_theta=10000.0, tie_word_embeddings=False)
PROMPTS = Path(__file__).resolve().parents[2] / "bench" / "data" / "chat_prompts.txt"


def random_model(quantize: str | None = None):
    """A small Llama with random weights in bf16 on the GPU, FP8 linears with ``quantize="fp8"``."""
    from engine.model.gptq import RoundToNearest

    return from_source(config_from_dict(SMALL), RandomSource(CUDA, seed=0), CUDA, torch.bfloat16,
                       quantize=RoundToNearest() if quantize == "fp8" else None)


def prefilled(model, prompt: torch.Tensor, max_len: int = 256):
    cache = model.new_cache(max_len)
    model.forward(prompt, cache, 0)
    return cache


@pytest.mark.parametrize("quantize", [None, "fp8"])
def test_decode_step_replayed_as_a_cuda_graph_equals_eager(quantize):
    from engine.model.cuda_graph import capture

    model = random_model(quantize)
    prompt = torch.randint(0, SMALL["vocab_size"], (1, 12), device=CUDA, generator=torch.Generator(CUDA).manual_seed(1))
    with torch.inference_mode():
        eager_cache, graph_cache = prefilled(model, prompt), prefilled(model, prompt)
        tok = torch.zeros((1, 1), dtype=torch.long, device=CUDA)
        pos = torch.tensor(12, device=CUDA)
        tok_g, pos_g = tok.clone(), pos.clone()
        graph, logits_g = capture(lambda: model.decode_step(tok_g, pos_g, graph_cache))
        for _ in range(8):
            logits = model.decode_step(tok, pos, eager_cache)
            graph.replay()
            torch.testing.assert_close(logits_g.float(), logits.float(), atol=2e-2, rtol=2e-2)
            assert torch.equal(logits_g.argmax(-1), logits.argmax(-1))
            tok.copy_(logits.argmax(-1, keepdim=True))
            tok_g.copy_(tok)
            pos.add_(1)
            pos_g.add_(1)


def test_medusa_verify_pass_replayed_as_a_cuda_graph_equals_eager():
    from engine.decoding.medusa.tree import build_tree
    from engine.decoding.speculative.verify import TreeGraph

    model = random_model()
    tree = build_tree([[0], [1], [2], [0, 0], [0, 1], [1, 0], [0, 0, 0]]).to(CUDA)
    g = torch.Generator(CUDA).manual_seed(2)
    prompt = torch.randint(0, SMALL["vocab_size"], (1, 20), device=CUDA, generator=g)
    with torch.inference_mode():
        eager_cache, graph_cache = prefilled(model, prompt), prefilled(model, prompt)
        verify = TreeGraph(model, tree, graph_cache)
        for step in range(3):
            tokens = torch.randint(0, SMALL["vocab_size"], (tree.num_nodes,), device=CUDA, generator=g)
            start = 20 + step * tree.num_nodes
            hidden_g, logits_g = verify(tokens, start)
            hidden = model.tree_hidden(tokens[None], eager_cache, start, tree.position_offsets, tree.attn_mask)[0]
            torch.testing.assert_close(hidden_g.float(), hidden.float(), atol=2e-2, rtol=2e-2)
            logits = model.logits(hidden.index_select(0, tree.inner))
            assert torch.equal(logits_g.argmax(-1), logits.argmax(-1))


def test_the_vram_figure_is_torchs_and_follows_allocations():
    from engine import memory

    used, total = memory.in_use(CUDA)
    assert used == torch.cuda.memory_reserved(CUDA) and total == torch.cuda.mem_get_info(CUDA)[1]
    block = torch.empty(256 << 20, dtype=torch.uint8, device=CUDA)
    assert memory.in_use(CUDA)[0] >= used + block.numel()
    assert memory.free(CUDA) == torch.cuda.mem_get_info(CUDA)[0]
    del block


@pytest.fixture(scope="module")
def embedded_installed():
    from engine.errors import EngineError
    from engine.hub.embedded import gguf_path

    try:
        gguf_path()
    except EngineError as e:
        pytest.skip(str(e))


def test_a_model_switch_gives_the_first_models_memory_back(embedded_installed):
    from engine.events import Error, Generate, LoadModel, SamplingParams
    from engine.serving.worker import Jobs

    def allocated():
        gc.collect()
        torch.cuda.synchronize()
        return torch.cuda.memory_allocated(CUDA)

    events = []
    jobs = Jobs()
    baseline = allocated()
    chat = Generate([{"role": "user", "content": "Name a colour."}], SamplingParams(max_new_tokens=8))
    held = []
    for decoding in ("plain", "medusa", "dmc", "plain"):
        jobs.run(LoadModel(device="cuda", decoding=decoding), events.append, threading.Event())
        jobs.run(chat, events.append, threading.Event())
        held.append(allocated())
    assert not [e for e in events if isinstance(e, Error)], events
    assert all(h > baseline for h in held), (baseline, held)
    # the second plain session holds what the first did: the medusa and dmc ones left nothing behind
    assert abs(held[3] - held[0]) <= 1 << 20, held
    jobs.close()
    assert allocated() - baseline <= 1 << 20, (baseline, allocated())


def test_greedy_on_the_gpu_follows_the_cpu(embedded_installed, embedded_session):
    """bf16 on the GPU against fp32 on the CPU: the same first 16 tokens on most of the 24 chat
    prompts (bf16 rounding may flip a near-tie; README: "Where the GPU path is checked")."""
    from engine.events import LoadModel, SamplingParams
    from engine.session import Session

    gpu = Session.load(LoadModel(device="cuda"))
    params = SamplingParams(max_new_tokens=16)
    same = 0
    prompts = PROMPTS.read_text().splitlines()[:24]
    for prompt in prompts:
        messages = [{"role": "user", "content": prompt}]
        runs = []
        for session in (embedded_session, gpu):
            session.reset()
            runs.append(list(session.generate(messages, params))[-1].stats.token_ids)
        same += runs[0] == runs[1]
    gpu.close()
    assert same >= 20, f"{same}/{len(prompts)} prompts with the same first 16 tokens"
