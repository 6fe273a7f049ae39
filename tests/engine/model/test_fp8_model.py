"""FP8 quantization on load (--quantize fp8): layer numerics, the embedded model still answers,
perplexity reported and close to the unquantized model's."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from engine.errors import EngineError
from engine.events import LoadModel, SamplingParams
from engine.model.linear import Fp8Linear
from engine.session import Session
from kernels.fp8_gemm import fp8_gemm_reference
from kernels.fp8_quant import quantize_rows_reference

ROOT = Path(__file__).resolve().parents[3]
SAMPLE = ROOT / "tests" / "data" / "sample.txt"


def test_fp8_linear_is_quantize_then_scaled_gemm():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(96, 200, generator=g) * 0.05
    x = torch.randn(3, 200, generator=g)
    b = torch.randn(96, generator=g)
    lin = Fp8Linear.quantize(w, b)
    assert lin.weight.dtype == torch.float8_e4m3fn and lin.weight_scale.shape == (96, 1)
    xq, xs = quantize_rows_reference(x)
    wq, ws = quantize_rows_reference(w)
    torch.testing.assert_close(lin(x), fp8_gemm_reference(xq, wq, xs, ws, b, out_dtype=torch.float32))
    exact = x @ w.t() + b
    assert (lin(x) - exact).norm() / exact.norm() < 0.05  # e4m3 keeps ~3 significant bits per value


def test_static_input_scale():
    w = torch.randn(32, 64) * 0.1
    wq, ws = quantize_rows_reference(w)
    lin = Fp8Linear(wq, ws.max(), input_scale=torch.tensor(0.01))
    x = torch.randn(2, 64)
    xq = (x / 0.01).clamp(-448, 448).to(torch.float8_e4m3fn)
    torch.testing.assert_close(lin(x), fp8_gemm_reference(xq, wq, torch.tensor(0.01), ws.max(), out_dtype=torch.float32))


def test_the_linears_are_fp8_and_the_lm_head_int8_or_bf16(tiny_checkpoint, tmp_path, monkeypatch):
    """The block linears FP8; the lm_head int8, calibrated with them, where our CPU kernel serves
    int8, else bf16; rounded to nearest in int8 or bf16 when asked for; or FP8 (calibrated with the
    rest and cached with it)."""
    from engine.model import gptq
    from engine.model.linear import Int8Linear, Linear

    monkeypatch.setenv("CHATAPP_CACHE_DIR", str(tmp_path / "cache"))  # its calibrated weights: not kept
    m = Session.load(LoadModel(model=str(tiny_checkpoint), device="cpu", quantize="fp8")).model
    assert all(isinstance(getattr(layer, n), Fp8Linear) for layer in m.layers for n in ("qkv", "o", "gate_up", "down"))
    assert m.embed.dtype == torch.float32  # the lookup table stays
    scale = m.embed.abs().amax(1) / 127
    rtn = (torch.round(m.embed / scale[:, None]) * scale[:, None]).t()
    if Int8Linear.in_panels("cpu"):
        assert isinstance(m.lm_head, Int8Linear) and m.lm_head.packed.dtype == torch.int8
        assert not torch.equal(m.lm_head.dense(), rtn)  # GPTQ rounds some weights the other way
        again = Session.load(LoadModel(model=str(tiny_checkpoint), device="cpu", quantize="fp8")).model
        assert torch.equal(again.lm_head.dense(), m.lm_head.dense())  # read from the cache
    else:
        assert isinstance(m.lm_head, Linear)
    int8 = gptq.RoundToNearest("int8").head(m.embed)
    assert isinstance(int8, Int8Linear) and torch.equal(int8.dense(), rtn)
    bf16 = gptq.RoundToNearest("bf16").head(m.embed)
    assert isinstance(bf16, Linear) and torch.equal(bf16.dense().float(), m.embed.t().to(torch.bfloat16).float())
    # an FP8 lm_head, calibrated with the rest and cached with it
    src = gptq.TensorSource(tiny_checkpoint)
    method = gptq.Fp8OnLoad(m.cfg, src, head_format="fp8")
    from engine.model.weights import from_source

    fp8 = from_source(m.cfg, src, "cpu", None, None, method)
    method.after_loading(fp8)
    assert isinstance(fp8.lm_head, Fp8Linear)
    again = gptq.Fp8OnLoad(m.cfg, gptq.TensorSource(tiny_checkpoint), head_format="fp8")
    assert again.cached is not None and again.path != gptq.Fp8OnLoad(m.cfg, src).path
    read = from_source(m.cfg, gptq.TensorSource(tiny_checkpoint), "cpu", None, None, again)
    assert torch.equal(read.lm_head.weight.view(torch.uint8), fp8.lm_head.weight.view(torch.uint8))


def test_fp8_embedded_model_still_answers():
    session = Session.load(LoadModel(device="cpu", quantize="fp8"))
    assert session.info().quantization == "fp8"
    done = list(session.generate([{"role": "user", "content": "What is the capital of France?"}],
                                 SamplingParams(max_new_tokens=16)))[-1]
    assert "Paris" in done.stats.text


@pytest.mark.slow
def test_run_cli_with_quantize_before_or_after_the_subcommand():
    for args in (["--quantize", "fp8", "run"], ["run", "--quantize", "fp8"]):
        r = subprocess.run([sys.executable, "-m", "chatapp", *args, "--prompt", "Hi", "--max-new-tokens", "2",
                            "--json"], capture_output=True, text=True, timeout=300, cwd=ROOT)
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout)["quantization"] == "fp8"


@pytest.mark.slow
def test_perplexity_cli_fp8_close_to_unquantized():
    def run(*extra):
        r = subprocess.run([sys.executable, "-m", "chatapp", "perplexity", "--file", str(SAMPLE), "--json", *extra],
                           capture_output=True, text=True, timeout=600, cwd=ROOT)
        assert r.returncode == 0, r.stderr
        return json.loads(r.stdout)

    full, fp8 = run(), run("--quantize", "fp8")
    assert full["tokens"] == fp8["tokens"] > 400
    assert 5 < full["perplexity"] < 60  # a real language model on English prose
    assert fp8["quantization"] == "fp8"
    assert abs(fp8["perplexity"] / full["perplexity"] - 1) < 0.03  # GPTQ rounding (round-to-nearest: ~3.4%)


def test_perplexity_matches_transformers_loss(embedded_session, hf_reference):
    """One window: exp of transformers' mean token loss."""
    from engine.perplexity import perplexity

    ids = embedded_session.tokenizer.encode(SAMPLE.read_text())[:300]
    with torch.inference_mode():
        loss = hf_reference(torch.tensor([ids]), labels=torch.tensor([ids])).loss
    ours = perplexity(embedded_session.model, ids, window=512)
    assert ours["tokens"] == 299
    assert ours["perplexity"] == pytest.approx(torch.exp(loss).item(), rel=1e-4)


def test_bf16_weights_on_load(tiny_checkpoint):
    """``--quantize bf16``: the block linears and the lm_head keep bfloat16 weights (in the CPU
    kernel's panels where it runs); the logits are those of the float32 model within bf16's
    rounding."""
    from kernels import cpu_gemm

    full = Session.load(LoadModel(model=str(tiny_checkpoint), device="cpu")).model
    half = Session.load(LoadModel(model=str(tiny_checkpoint), device="cpu", quantize="bf16"))
    assert half.info().quantization == "bf16"
    m = half.model
    for lin in [m.lm_head, *(getattr(layer, n) for layer in m.layers for n in ("qkv", "o", "gate_up", "down"))]:
        stored = lin.packed if lin.packed is not None else lin.weight
        assert stored.dtype == (torch.bfloat16 if cpu_gemm.available() else torch.float32)
    assert m.weight_bytes() < 0.75 * full.weight_bytes() or not cpu_gemm.available()
    ids = torch.tensor([[1, 5, 9, 2, 7, 3]])
    a = full.forward_all(ids, full.new_cache(8), 0)
    b = m.forward_all(ids, m.new_cache(8), 0)
    torch.testing.assert_close(b, a, atol=0.05 * a.abs().max().item(), rtol=0.05)
