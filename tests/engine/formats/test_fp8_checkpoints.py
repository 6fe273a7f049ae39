"""FP8 checkpoints in the published layouts (modelopt; compressed-tensors dense and 2:4
sparse-24-bitmask), written here from a tiny random Llama, load and match a reference: the
same model in transformers with dequantized weights and each linear layer's input quantized as
the format says (fake quantization)."""

import json

import pytest
import torch
from safetensors.torch import save_file
from transformers import LlamaConfig, LlamaForCausalLM

from engine.errors import EngineError
from engine.model.linear import Fp8Linear
from engine.model.weights import from_dir

FP8 = torch.float8_e4m3fn
BLOCK_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def tiny_model(seed=0):
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      tie_word_embeddings=False, rms_norm_eps=1e-5)
    return LlamaForCausalLM(cfg).eval()


def linears(model):
    return {n: m for n, m in model.named_modules() if n.split(".")[-1] in BLOCK_LINEARS}


def calibrate(model, ids):
    """Per module: the largest |input| over a calibration batch (for static input scales)."""
    amax, hooks = {}, []
    for name, mod in linears(model).items():
        hooks.append(mod.register_forward_pre_hook(
            lambda m, args, name=name: amax.__setitem__(name, max(amax.get(name, 0.0), args[0].abs().max().item()))))
    with torch.no_grad():
        model(ids)
    for h in hooks:
        h.remove()
    return amax


def fake_quant_reference(model, weights, weight_scales, input_scales=None):
    """Dequantized weights, and inputs quantized per tensor (static scales) or per token."""
    ref = tiny_model()
    ref.load_state_dict(model.state_dict())
    for name, mod in linears(ref).items():
        with torch.no_grad():
            mod.weight.copy_(weights[name].float() * weight_scales[name].float().reshape(-1, 1))

        def hook(m, args, name=name):
            x = args[0]
            if input_scales is not None:
                s = input_scales[name]
            else:
                s = x.abs().amax(-1, keepdim=True).clamp(min=1e-12) / 448
            return ((x / s).clamp(-448, 448).to(FP8).float() * s,)

        mod.register_forward_pre_hook(hook)
    return ref


def base_tensors(model):
    return {k: v.contiguous() for k, v in model.state_dict().items()
            if not any(f"{p}.weight" in k for p in BLOCK_LINEARS)}


def write(path, model, tensors, config_extra=None, files=None):
    model.config.save_pretrained(path)
    if config_extra:
        cfg = json.loads((path / "config.json").read_text())
        cfg.update(config_extra)
        (path / "config.json").write_text(json.dumps(cfg))
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    for name, content in (files or {}).items():
        (path / name).write_text(json.dumps(content))


def ids():
    return torch.randint(0, 256, (1, 24), generator=torch.Generator().manual_seed(5))


def compare(path, reference):
    ours = from_dir(path)
    x = ids()
    with torch.no_grad():
        expected = reference(x).logits
    got = ours.forward_all(x, ours.new_cache(64), 0)
    torch.testing.assert_close(got, expected, atol=3e-3, rtol=3e-3)
    return ours, got


def write_modelopt(path, model, kv_scales=True):
    amax = calibrate(model, ids())
    tensors = base_tensors(model)
    weights, wscales, iscales = {}, {}, {}
    for i, (name, mod) in enumerate(linears(model).items()):
        w = mod.weight.detach()
        s = w.abs().max() / 448 * (1 + 0.1 * (i % 3))  # q/k/v (and gate/up) get different weight scales
        weights[name], wscales[name] = (w / s).clamp(-448, 448).to(FP8), s
        group = name.rsplit(".", 1)[0]  # the export shares one input scale across a fused group
        shared = max(v for k, v in amax.items() if k.rsplit(".", 1)[0] == group and
                     (k.endswith(("q_proj", "k_proj", "v_proj")) == name.endswith(("q_proj", "k_proj", "v_proj"))))
        iscales[name] = torch.tensor(shared / 448)
        tensors[f"{name}.weight"] = weights[name]
        tensors[f"{name}.weight_scale"] = s.float().reshape(())
        tensors[f"{name}.input_scale"] = iscales[name].float()
    if kv_scales:
        for li in range(model.config.num_hidden_layers):
            tensors[f"model.layers.{li}.self_attn.k_proj.k_scale"] = torch.tensor(1.0)
            tensors[f"model.layers.{li}.self_attn.v_proj.v_scale"] = torch.tensor(1.0)
    quant = {"quant_algo": "FP8", "kv_cache_quant_algo": "FP8" if kv_scales else None,
             "exclude_modules": ["lm_head"]}
    write(path, model, tensors, files={"hf_quant_config.json": {
        "producer": {"name": "modelopt", "version": "0.19.0"}, "quantization": quant}})
    return fake_quant_reference(model, weights, wscales, iscales)


def test_modelopt_fp8_matches_fake_quant_reference(tmp_path):
    model = tiny_model()
    reference = write_modelopt(tmp_path, model)
    ours, _ = compare(tmp_path, reference)
    layer = ours.layers[0]
    assert isinstance(layer.qkv, Fp8Linear) and layer.qkv.input_scale is not None
    assert layer.qkv.weight_scale.shape == (64 + 32 + 32, 1)  # per-part scales kept exactly
    assert not isinstance(ours.lm_head, Fp8Linear)


def compressed_tensors_config(sparse_format=None, strategy="channel"):
    qc = {"quant_method": "compressed-tensors", "format": "float-quantized", "quantization_status": "compressed",
          "config_groups": {"group_0": {"targets": ["Linear"],
                                        "weights": {"num_bits": 8, "type": "float", "strategy": strategy,
                                                    "symmetric": True, "dynamic": False},
                                        "input_activations": {"num_bits": 8, "type": "float", "strategy": "token",
                                                              "symmetric": True, "dynamic": True}}},
          "ignore": ["lm_head"]}
    if sparse_format:
        qc["sparsity_config"] = {"format": sparse_format, "sparsity_structure": "2:4", "targets": ["Linear"],
                                 "ignore": ["lm_head"], "global_sparsity": 0.5}
    return {"quantization_config": qc}


def prune_24(w):
    groups = w.reshape(w.shape[0], -1, 4)
    keep = groups.abs().topk(2, dim=-1).indices
    mask = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, keep, True)
    return (groups * mask).reshape(w.shape)


def channel_quantized(model, sparse=False):
    weights, scales = {}, {}
    for name, mod in linears(model).items():
        w = mod.weight.detach()
        if sparse:
            w = prune_24(w)
        s = w.abs().amax(1, keepdim=True) / 448
        weights[name], scales[name] = (w / s).clamp(-448, 448).to(FP8), s.to(torch.bfloat16)
    return weights, scales


def test_compressed_tensors_fp8_dynamic_matches_reference(tmp_path):
    model = tiny_model()
    weights, scales = channel_quantized(model)
    tensors = base_tensors(model)
    for name in weights:
        tensors[f"{name}.weight"], tensors[f"{name}.weight_scale"] = weights[name], scales[name]
    write(tmp_path, model, tensors, compressed_tensors_config())
    ours, _ = compare(tmp_path, fake_quant_reference(model, weights, scales))
    assert ours.layers[1].gate_up.input_scale is None  # dynamic per token
    assert ours.layers[1].gate_up.weight_scale.shape == (256, 1)


def pack_bitmask(mask):
    """numpy.packbits(mask, axis=-1, bitorder="little"), as compressed-tensors stores it."""
    rows, cols = mask.shape
    padded = torch.zeros(rows, (cols + 7) // 8 * 8, dtype=torch.uint8)
    padded[:, :cols] = mask.to(torch.uint8)
    weights = (1 << torch.arange(8, dtype=torch.int32)).to(torch.uint8)
    return (padded.reshape(rows, -1, 8) * weights).sum(-1).to(torch.uint8)


def test_compressed_tensors_24_bitmask_equals_dense_storage(tmp_path):
    model = tiny_model()
    weights, scales = channel_quantized(model, sparse=True)
    dense, packed = base_tensors(model), base_tensors(model)
    for name, q in weights.items():
        dense[f"{name}.weight"] = q
        mask = q.view(torch.uint8) & 0x7F != 0  # nonzero values (-0 counts as zero)
        packed[f"{name}.compressed"] = q.view(torch.uint8)[mask].reshape(q.shape[0], -1).view(FP8)
        packed[f"{name}.bitmask"] = pack_bitmask(mask)
        packed[f"{name}.shape"] = torch.tensor(list(q.shape)).reshape(-1, 1)
        dense[f"{name}.weight_scale"] = packed[f"{name}.weight_scale"] = scales[name]
    (tmp_path / "dense").mkdir()
    (tmp_path / "bitmask").mkdir()
    write(tmp_path / "dense", model, dense, compressed_tensors_config("dense"))
    write(tmp_path / "bitmask", model, packed, compressed_tensors_config("sparse-24-bitmask"))
    _, from_dense = compare(tmp_path / "dense", fake_quant_reference(model, weights, scales))
    ours = from_dir(tmp_path / "bitmask")
    assert torch.equal(ours.layers[0].gate_up.weight.float(),  # (-0 is stored as a zero: equal as values)
                       torch.cat([weights["model.layers.0.mlp.gate_proj"],
                                  weights["model.layers.0.mlp.up_proj"]]).float())
    got = ours.forward_all(ids(), ours.new_cache(64), 0)
    assert torch.equal(got, from_dense)


def test_unsupported_and_broken_checkpoints_are_named(tmp_path):
    model = tiny_model()
    write_modelopt(tmp_path, model)
    cfg_file = tmp_path / "hf_quant_config.json"
    good = json.loads(cfg_file.read_text())
    cfg_file.write_text(json.dumps({**good, "quantization": {**good["quantization"], "quant_algo": "NVFP4"}}))
    with pytest.raises(EngineError, match=r"hf_quant_config.json: quant_algo 'NVFP4' is not supported"):
        from_dir(tmp_path)
    cfg_file.write_text(json.dumps(good))

    from safetensors.torch import load_file
    tensors = load_file(tmp_path / "model.safetensors")
    del tensors["model.layers.1.mlp.down_proj.weight_scale"]
    save_file(tensors, str(tmp_path / "model.safetensors"))
    with pytest.raises(EngineError, match=r"tensor 'model.layers.1.mlp.down_proj.weight_scale' is missing"):
        from_dir(tmp_path)

    qc = compressed_tensors_config()
    qc["quantization_config"]["config_groups"]["group_0"]["weights"].update(num_bits=4, type="int")
    cfg = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**cfg, **qc}))
    with pytest.raises(EngineError, match=r"group_0.weights: 4-bit int weights are not supported"):
        from_dir(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "quantization_config": {"quant_method": "gptq"}}))
    with pytest.raises(EngineError, match=r"quantization method 'gptq' is not supported"):
        from_dir(tmp_path)


def test_checkpoint_written_by_compressed_tensors(tmp_path):
    """The official writer (compressed-tensors, FP8-dynamic scheme) produces what we load."""
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import QuantizationConfig, QuantizationScheme, apply_quantization_config
    from compressed_tensors.quantization.quant_scheme import FP8_DYNAMIC
    from compressed_tensors.quantization.utils import calculate_qparams
    from safetensors.torch import load_file

    model = tiny_model()
    original = tiny_model()
    apply_quantization_config(model, QuantizationConfig(
        config_groups={"group_0": QuantizationScheme(targets=["Linear"], **FP8_DYNAMIC)}, ignore=["lm_head"]))
    for mod in linears(model).values():
        w = mod.weight.detach()
        scale, _ = calculate_qparams(w.amin(dim=1, keepdim=True), w.amax(dim=1, keepdim=True),
                                     mod.quantization_scheme.weights)
        mod.weight_scale.data.copy_(scale.reshape(mod.weight_scale.shape))
    compressor = ModelCompressor.from_pretrained_model(model, quantization_format="float-quantized")
    compressor.compress_model(model)
    model.save_pretrained(tmp_path)
    compressor.update_config(tmp_path)

    stored = load_file(tmp_path / "model.safetensors")
    names = linears(original)
    weights = {n: stored[f"{n}.weight"] for n in names}
    scales = {n: stored[f"{n}.weight_scale"] for n in names}
    assert all(w.dtype == FP8 for w in weights.values())
    ours, _ = compare(tmp_path, fake_quant_reference(original, weights, scales))
    assert ours.layers[0].qkv.input_scale is None and ours.layers[0].qkv.weight_scale.shape == (128, 1)


def test_checkpoint_written_by_modelopt(tmp_path):
    """The official writer (TensorRT Model Optimizer, FP8_DEFAULT_CFG, calibrated) produces what we load."""
    import modelopt.torch.quantization as mtq
    from modelopt.torch.export import export_hf_checkpoint
    from safetensors.torch import load_file

    model, original = tiny_model(), tiny_model()
    model.config.architectures = ["LlamaForCausalLM"]

    def calibration(m):
        with torch.no_grad():
            m(ids())

    mtq.quantize(model, mtq.FP8_DEFAULT_CFG, calibration)
    export_hf_checkpoint(model, export_dir=tmp_path)
    assert json.loads((tmp_path / "hf_quant_config.json").read_text())["producer"]["name"] == "modelopt"

    stored = load_file(tmp_path / "model.safetensors")
    names = linears(original)
    ref = fake_quant_reference(original, {n: stored[f"{n}.weight"] for n in names},
                               {n: stored[f"{n}.weight_scale"] for n in names},
                               {n: stored[f"{n}.input_scale"] for n in names})
    ours, _ = compare(tmp_path, ref)
    assert ours.layers[0].qkv.input_scale is not None


def test_exclusion_patterns():
    from engine.formats.fp8 import CompressedTensorsFp8, ModelOptFp8

    mo = ModelOptFp8("hf_quant_config.json", {"quant_algo": "FP8",
                                              "exclude_modules": ["lm_head", "model.layers.1.mlp", "*.v_proj"]})
    assert not mo.quantized("lm_head") and not mo.quantized("model.layers.1.mlp.down_proj")
    assert not mo.quantized("model.layers.0.self_attn.v_proj") and mo.quantized("model.layers.0.mlp.down_proj")
    ct = CompressedTensorsFp8("config.json", {**compressed_tensors_config()["quantization_config"],
                                              "ignore": ["lm_head", "re:.*layers\\.1\\..*down_proj"]})
    assert not ct.quantized("lm_head") and not ct.quantized("model.layers.1.mlp.down_proj")
    assert ct.quantized("model.layers.0.mlp.down_proj") and ct.quantized("model.layers.11.mlp.down_proj")
