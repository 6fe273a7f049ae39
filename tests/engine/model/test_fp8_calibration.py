"""FP8 quantization on load with GPTQ rounding (engine/model/gptq.py): the rounding itself,
the calibration of a whole model, and the cache of rounded weights."""

import pytest
import torch

from engine.model import gptq as fc
from engine.model.linear import Fp8Linear
from engine.events import LoadModel
from engine.load import load
from engine.model.weights import from_dir, from_source
from kernels.fp8_quant import FP8, quantize_rows_reference


def correlated_inputs(n, k, g):
    """Inputs whose features are correlated and of very different sizes, as a model's are."""
    mix = torch.randn(k, k, generator=g) / k ** 0.5 + torch.eye(k)
    return (torch.randn(n, k, generator=g) * torch.logspace(0, 1.5, k)) @ mix


def test_gptq_rounds_to_e4m3_with_the_row_scales_and_lowers_the_output_error():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(48, 96, generator=g) * 0.05
    x = correlated_inputs(512, 96, g)
    q, scale = fc.gptq_round(w, x.t() @ x)
    assert q.dtype == FP8 and q.shape == w.shape and scale.shape == (48, 1)
    rtn, rtn_scale = quantize_rows_reference(w)
    torch.testing.assert_close(scale, rtn_scale)  # the same scales: max of each row / 448
    assert (q.float() != rtn.float()).float().mean() > 0.05  # some weights round the other way
    exact = x @ w.t()
    err_gptq = (x @ (q.float() * scale).t() - exact).norm()
    err_rtn = (x @ (rtn.float() * rtn_scale).t() - exact).norm()
    assert err_gptq < 0.7 * err_rtn


def test_gptq_rounds_to_int8_and_lowers_the_output_error():
    g = torch.Generator().manual_seed(3)
    w = torch.randn(48, 96, generator=g) * 0.05
    x = correlated_inputs(512, 96, g)
    q, scale = fc.gptq_round(w, x.t() @ x, "int8")
    assert q.dtype == torch.int8 and q.abs().max() <= 127 and scale.shape == (48, 1)
    torch.testing.assert_close(scale, w.abs().amax(1, keepdim=True) / 127)
    rtn = torch.round(w / scale)
    exact = x @ w.t()
    err_gptq = (x @ (q.float() * scale).t() - exact).norm()
    err_rtn = (x @ (rtn * scale).t() - exact).norm()
    assert err_gptq < 0.7 * err_rtn


def test_gptq_with_uncorrelated_inputs_is_round_to_nearest():
    """H diagonal: no error is carried to other columns, so every weight rounds to nearest."""
    g = torch.Generator().manual_seed(1)
    w = torch.randn(16, 40, generator=g)
    h = torch.diag(torch.rand(40, generator=g) + 0.5)
    q, scale = fc.gptq_round(w, h, block=16)
    rtn, rtn_scale = quantize_rows_reference(w)
    assert torch.equal(q.float(), rtn.float()) and torch.equal(scale, rtn_scale)


def test_inputs_that_were_always_zero_do_not_break_the_rounding():
    g = torch.Generator().manual_seed(2)
    w = torch.randn(8, 32, generator=g)
    x = torch.randn(64, 32, generator=g)
    x[:, 5] = 0
    q, scale = fc.gptq_round(w, x.t() @ x)
    assert torch.isfinite(q.float()).all() and q.float()[:, 5].abs().sum() == 0


def fp8_model(path, progress=lambda msg: None):
    """The model ``--quantize fp8`` loads (engine/load.py)."""
    return load(LoadModel(model=str(path), device="cpu", quantize="fp8"), progress).model


def test_a_tiny_model_is_calibrated_once_then_read_from_the_cache(tiny_checkpoint, tmp_path, monkeypatch):
    monkeypatch.setenv("CHATAPP_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(fc, "SAMPLES", 4)
    monkeypatch.setattr(fc, "LENGTH", 32)
    said = []
    model = fp8_model(tiny_checkpoint, said.append)
    assert any("FP8 calibration done" in s for s in said)
    layers = ("qkv", "o", "gate_up", "down")
    assert all(isinstance(getattr(ly, n), Fp8Linear) for ly in model.layers for n in layers)
    cached = list((tmp_path / "cache" / "fp8").glob("*.safetensors"))
    assert len(cached) == 1

    rtn = from_source(model.cfg, fc.TensorSource(tiny_checkpoint), "cpu", quantize=fc.RoundToNearest())
    differ = [not torch.equal(getattr(a, n).weight.float(), getattr(b, n).weight.float())
              for a, b in zip(model.layers, rtn.layers) for n in layers]
    assert any(differ)  # not round-to-nearest
    assert all(torch.equal(getattr(a, n).weight_scale, getattr(b, n).weight_scale)
               for a, b in zip(model.layers, rtn.layers) for n in layers)

    monkeypatch.setattr(fc, "calibrate", lambda *a, **k: pytest.fail("calibrated again"))
    again = fp8_model(tiny_checkpoint)
    assert all(torch.equal(getattr(a, n).weight.float(), getattr(b, n).weight.float())
               for a, b in zip(model.layers, again.layers) for n in layers)
    ids = torch.tensor([[1, 5, 9, 13]])
    torch.testing.assert_close(model.forward(ids, model.new_cache(8), 0), again.forward(ids, again.new_cache(8), 0))


def test_the_cache_key_follows_the_weights_and_a_bad_cache_file_is_recomputed(tiny_checkpoint, tmp_path,
                                                                                monkeypatch):
    monkeypatch.setenv("CHATAPP_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(fc, "SAMPLES", 2)
    monkeypatch.setattr(fc, "LENGTH", 16)
    src = fc.TensorSource(tiny_checkpoint)
    cfg = from_dir(tiny_checkpoint).cfg
    key = fc.cache_key(cfg, src)
    assert key == fc.cache_key(cfg, fc.TensorSource(tiny_checkpoint))
    weights = tiny_checkpoint / "model.safetensors"
    weights.write_bytes(weights.read_bytes())  # rewritten: a new modification time
    assert fc.cache_key(cfg, fc.TensorSource(tiny_checkpoint)) != key

    fp8_model(tiny_checkpoint)
    (cached,) = (tmp_path / "cache" / "fp8").glob("*.safetensors")
    cached.write_bytes(b"not safetensors")
    calls = []
    real = fc.calibrate
    monkeypatch.setattr(fc, "calibrate", lambda *a, **k: calls.append(1) or real(*a, **k))
    fp8_model(tiny_checkpoint)
    assert calls == [1] and cached.stat().st_size > 100
