"""Loading Medusa heads, strictly, from the modelopt export layout and FasterDecoding's files."""

import json
import pickle

import pytest
import torch
from safetensors.torch import load_file, save_file

from engine.formats.tensor_source import TensorSource
from engine.config import load_config
from engine.errors import EngineError
from engine.decoding.medusa.heads import load_fasterdecoding, load_heads

H, V = 64, 49152


def head_tensors(prefix, heads=3, layers=1, own_lm_head=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    t = {}
    for h in range(heads):
        for l in range(layers):
            t[f"{prefix}{h}.{l}.linear.weight"] = torch.randn(H, H, generator=g) * 0.05
            t[f"{prefix}{h}.{l}.linear.bias"] = torch.randn(H, generator=g) * 0.05
        if own_lm_head:
            t[f"{prefix}{h}.{layers}.weight"] = torch.randn(V, H, generator=g) * 0.05
    return t


def reference(tensors, prefix, x, h, layers, own, base_lm_head):
    for l in range(layers):
        x = x + torch.nn.functional.silu(x @ tensors[f"{prefix}{h}.{l}.linear.weight"].t()
                                         + tensors[f"{prefix}{h}.{l}.linear.bias"])
    w = tensors[f"{prefix}{h}.{layers}.weight"] if own else base_lm_head
    return x @ w.t()


def test_modelopt_layout_beside_the_base_model(tiny_checkpoint):
    base = load_file(tiny_checkpoint / "model.safetensors")
    heads = head_tensors("medusa_heads.", layers=2)
    save_file({**base, **heads}, str(tiny_checkpoint / "model.safetensors"))
    cfg_file = tiny_checkpoint / "config.json"
    cfg_file.write_text(json.dumps({**json.loads(cfg_file.read_text()),
                                    "medusa": {"num_medusa_heads": 3, "num_medusa_layers": 2}}))
    cfg = load_config(tiny_checkpoint)
    src = TensorSource(tiny_checkpoint)
    loaded = load_heads(tiny_checkpoint, cfg.medusa, src, H, V, "cpu", torch.float32)
    assert loaded.num_heads == 3 and loaded.lm_heads is not None
    x = torch.randn(2, H)
    got = loaded(x, base_lm_head=None)
    for h in range(3):
        torch.testing.assert_close(got[h], reference(heads, "medusa_heads.", x, h, 2, True, None),
                                   atol=1e-4, rtol=1e-4)

    # the config and the tensors must agree
    cfg_file.write_text(json.dumps({**json.loads(cfg_file.read_text()),
                                    "medusa": {"num_medusa_heads": 4, "num_medusa_layers": 2}}))
    with pytest.raises(EngineError, match="config.json says 4 Medusa heads of 2 layers, the checkpoint holds 3"):
        load_heads(tiny_checkpoint, load_config(tiny_checkpoint).medusa, src, H, V, "cpu", torch.float32)


def test_fasterdecoding_safetensors_and_pt(tmp_path):
    heads = head_tensors("", heads=2, own_lm_head=False)  # Medusa-2: the base lm_head is shared
    save_file(heads, str(tmp_path / "medusa_lm_head.safetensors"))
    torch.save({f"medusa_head.{k}": v for k, v in heads.items()}, tmp_path / "medusa_lm_head.pt")
    x = torch.randn(3, H)
    base_lm_head = torch.randn(V, H) * 0.05
    from engine.model.linear import Linear

    lm = Linear(base_lm_head.t(), None, 2)
    for name in ("medusa_lm_head.safetensors", "medusa_lm_head.pt"):
        loaded = load_fasterdecoding(tmp_path / name, H, V, "cpu", torch.float32)
        assert loaded.lm_heads is None and loaded.num_heads == 2
        got = loaded(x, lm)
        for h in range(2):
            torch.testing.assert_close(got[h], reference(heads, "", x, h, 1, False, base_lm_head), atol=1e-4,
                                       rtol=1e-4)


class Exploit:
    def __reduce__(self):
        import os
        return (os.system, ("echo pwned > /tmp/chatapp-pwned",))


def test_pickle_that_would_run_code_is_refused(tmp_path):
    path = tmp_path / "medusa_lm_head.pt"
    with open(path, "wb") as f:
        pickle.dump({"0.0.linear.weight": Exploit()}, f)
    with pytest.raises(EngineError, match="medusa_lm_head.pt: not a PyTorch file this loader can read safely"):
        load_fasterdecoding(path, H, V, "cpu", torch.float32)
    import os
    assert not os.path.exists("/tmp/chatapp-pwned")


def test_missing_and_extra_tensors_are_errors(tmp_path):
    heads = head_tensors("", heads=2)
    missing = dict(heads)
    del missing["1.0.linear.bias"]
    save_file(missing, str(tmp_path / "medusa_lm_head.safetensors"))
    with pytest.raises(EngineError, match=r"tensor '1.0.linear.bias' is missing"):
        load_fasterdecoding(tmp_path / "medusa_lm_head.safetensors", H, V, "cpu", torch.float32)
    save_file({**heads, "0.0.linear.extra": torch.zeros(1)}, str(tmp_path / "medusa_lm_head.safetensors"))
    with pytest.raises(EngineError, match=r"unexpected Medusa tensor '0.0.linear.extra'"):
        load_fasterdecoding(tmp_path / "medusa_lm_head.safetensors", H, V, "cpu", torch.float32)


@pytest.mark.slow
def test_run_with_medusa_decoding(tiny_checkpoint):
    """`chatapp run --decoding medusa` on a checkpoint with heads: the greedy text of plain
    decoding, with the accepted tokens of each step reported."""
    import subprocess
    import sys

    base = load_file(tiny_checkpoint / "model.safetensors")
    g = torch.Generator().manual_seed(1)
    heads = {}
    for h in range(2):  # zero ResBlocks + the base (tied) embedding as each head's lm_head: real proposals
        heads[f"medusa_heads.{h}.0.linear.weight"] = torch.zeros(H, H)
        heads[f"medusa_heads.{h}.0.linear.bias"] = torch.zeros(H)
        heads[f"medusa_heads.{h}.1.weight"] = base["model.embed_tokens.weight"] + 0.01 * torch.randn(V, H, generator=g)
    save_file({**base, **heads}, str(tiny_checkpoint / "model.safetensors"))
    cfg_file = tiny_checkpoint / "config.json"
    cfg_file.write_text(json.dumps({**json.loads(cfg_file.read_text()),
                                    "medusa": {"num_medusa_heads": 2, "num_medusa_layers": 1}}))

    def run(*extra):
        r = subprocess.run([sys.executable, "-m", "chatapp", "run", "--model", str(tiny_checkpoint), "--prompt",
                            "hello", "--max-new-tokens", "24", "--ignore-eos", "--json", *extra],
                           capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr
        return json.loads(r.stdout)

    plain, spec = run(), run("--decoding", "medusa")
    assert spec["decoding"] == "medusa" and plain["decoding"] == "plain"
    assert spec["token_ids"] == plain["token_ids"] and spec["text"] == plain["text"]
    assert sum(spec["accepted_per_step"]) == spec["n_generated"] == 24
    assert spec["steps"] == len(spec["accepted_per_step"]) and max(spec["accepted_per_step"]) <= 3


def test_medusa_decoding_without_heads_is_a_clear_error(tiny_checkpoint):
    from engine.events import LoadModel
    from engine.session import Session

    with pytest.raises(EngineError, match="the checkpoint has no Medusa heads"):
        Session.load(LoadModel(model=str(tiny_checkpoint), device="cpu", decoding="medusa"))
