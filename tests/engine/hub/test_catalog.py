"""The model catalog: architecture fields, memory estimates and verdicts, device memory,
download sizes (hub, catalog fallback), the model list and `chatapp models`."""

import json
import sys
from pathlib import Path

import httpx2
import pytest

from engine.hub import catalog
from engine.hub.catalog import GiB, DeviceMemory, estimate_memory, find

from fakes.hub import FakeHub, install  # noqa: E402

MEDUSA = "nvidia/Llama-3.1-8B-Medusa-FP8"
DMC = "nvidia/Llama-2-7B-DMC-8x"
BIG = "nvidia/Llama-3.1-405B-Instruct-FP8"


def test_catalog_entries_carry_the_published_architectures():
    by_id = {e.id: e for e in catalog.entries()}
    assert len(by_id) == len(catalog.catalog())
    for e in by_id.values():
        assert e.num_layers and e.num_kv_heads and e.head_dim and e.max_context and e.bytes_per_weight, e.id
    m = by_id[MEDUSA]
    assert (m.num_layers, m.num_kv_heads, m.head_dim, m.max_context, m.bytes_per_weight) == (32, 8, 128, 131072, 1)
    assert (by_id[BIG].num_layers, by_id[BIG].num_gpus, by_id[BIG].multi_gpu) == (126, 8, True)
    assert (by_id[DMC].num_kv_heads, by_id[DMC].max_context, by_id[DMC].kv_compression) == (32, 4096, 8.0)
    smol = by_id["SmolLM2-135M-Instruct"]
    assert (smol.num_layers, smol.num_kv_heads, smol.head_dim, smol.max_context) == (30, 3, 64, 8192)
    assert not by_id["meta-llama/Llama-3.1-8B-Instruct"].multi_gpu and by_id["meta-llama/Llama-3.1-8B-Instruct"].gated
    # lookups are case-insensitive, the embedded model also answers to its repository
    assert find(MEDUSA.lower()).id == MEDUSA and find("HuggingFaceTB/SmolLM2-135M-Instruct").source == "embedded"
    assert find("nobody/nothing") is None


def test_kv_cache_arithmetic():
    m = find(MEDUSA)
    est = estimate_memory(m, 131072, 80 * GiB, 80 * GiB)
    assert est.kv_bytes == 2 * 32 * 8 * 128 * 2 * 131072 == 16 * GiB  # K+V, bf16, all layers
    assert est.weights_bytes == int(9.6e9)
    assert est.overhead_bytes == int(GiB + 0.05 * (est.weights_bytes + est.kv_bytes))
    assert est.total_bytes == est.weights_bytes + est.kv_bytes + est.overhead_bytes
    # the default context is the engine's: min(model's, 8192)
    assert estimate_memory(m, None, 80 * GiB, None).context == 8192
    assert estimate_memory(find(DMC), None, 80 * GiB, None).context == 4096


def test_8b_fp8_fits_an_80_gib_gpu():
    est = estimate_memory(find(MEDUSA), 131072, int(78.2 * GiB), 80 * GiB)
    assert est.verdict == "fits", est.reason
    assert est.reason.startswith("needs ") and "78.2 GiB free" in est.reason


def test_8b_fp8_with_128k_context_wont_fit_12_gib_and_says_the_kv_cache_is_why():
    est = estimate_memory(find(MEDUSA), 131072, 12 * GiB, 12 * GiB)
    assert est.verdict == "won't fit"
    assert "KV cache" in est.reason and "131072 tokens" in est.reason and "16.0 GiB" in est.reason
    # and it says which context would fit, which does
    assert est.max_context_that_fits is not None and 0 < est.max_context_that_fits < 131072
    assert f"--context {est.max_context_that_fits - est.max_context_that_fits % 1024}" in est.reason
    assert estimate_memory(find(MEDUSA), est.max_context_that_fits, 12 * GiB, None).verdict in ("fits", "tight")


def test_weights_alone_too_big_says_so():
    est = estimate_memory(find("meta-llama/Llama-3.1-8B-Instruct"), 4096, 8 * GiB, 8 * GiB)
    assert est.verdict == "won't fit" and "weights alone" in est.reason


def test_tight_between_90_and_100_percent():
    m = find(MEDUSA)
    need = estimate_memory(m, 8192, 1000 * GiB, None).total_bytes
    est = estimate_memory(m, 8192, int(need / 0.95), None)
    assert est.verdict == "tight" and est.reason.startswith("tight: ") and "95%" in est.reason
    assert estimate_memory(m, 8192, need - 1, None).verdict == "won't fit"
    assert estimate_memory(m, 8192, int(need / 0.8), None).verdict == "fits"


def test_405b_always_gets_the_remote_server_way():
    for free in (80 * GiB, 10_000 * GiB, None):
        est = estimate_memory(find(BIG), 8192, free, free)
        assert est.verdict == "won't fit"
        assert "needs 8 GPUs" in est.reason and "410 GB" in est.reason
        assert "vllm serve nvidia/Llama-3.1-405B-Instruct-FP8" in est.reason
        assert f"chatapp --remote http://HOST:8000/v1 --model {BIG}" in est.reason


def test_dmc_ratio_shrinks_the_kv_cache():
    dmc = find(DMC)
    plain = find("meta-llama/Llama-2-7b-hf")
    a = estimate_memory(dmc, 4096, 80 * GiB, None)
    b = estimate_memory(plain, 4096, 80 * GiB, None)
    assert b.kv_bytes == 2 * 32 * 32 * 128 * 2 * 4096 == 2 * GiB
    assert a.kv_bytes * 8 == b.kv_bytes and a.weights_bytes == b.weights_bytes


def test_cpu_counts_fp32_for_16_bit_models():
    smol = find("SmolLM2-135M-Instruct")
    gpu = estimate_memory(smol, 8192, 8 * GiB, None)
    cpu = estimate_memory(smol, 8192, 8 * GiB, None, on_cpu=True)
    assert cpu.weights_bytes == 2 * gpu.weights_bytes and cpu.kv_bytes == 2 * gpu.kv_bytes
    # FP8 weights stay as stored
    assert estimate_memory(find(MEDUSA), 8192, None, None, on_cpu=True).weights_bytes == int(9.6e9)


def test_unknown_device_memory_is_not_a_crash():
    est = estimate_memory(find(MEDUSA), 8192, None, None)
    assert est.verdict in catalog.VERDICTS and "unknown" in est.reason
    est = estimate_memory(find(MEDUSA), 8192, None, 80 * GiB)  # only the total known: judged on it
    assert est.verdict == "fits" and "in total" in est.reason


def test_device_memory_gpu_from_nvidia_smi(monkeypatch):
    monkeypatch.setattr(catalog, "_nvidia_smi", lambda: "NVIDIA H100 80GB HBM3, 80000, 81559\nNVIDIA H100, 1, 2\n")
    d = catalog.device_memory()
    assert d == ("NVIDIA H100 80GB HBM3", 80000 * 1024 ** 2, 81559 * 1024 ** 2) and not d.is_cpu


def test_device_memory_falls_back_to_ram(monkeypatch):
    monkeypatch.setattr(catalog, "_nvidia_smi", lambda: None)
    monkeypatch.setattr(catalog, "_meminfo", lambda: "MemTotal:       16384000 kB\nMemFree:  100 kB\n"
                                                     "MemAvailable:    8192000 kB\n")
    name, free, total = catalog.device_memory()
    assert (name, free, total) == ("CPU", 8192000 * 1024, 16384000 * 1024)
    # garbage from nvidia-smi is not a GPU either
    monkeypatch.setattr(catalog, "_nvidia_smi", lambda: "No devices were found")
    assert catalog.device_memory().is_cpu
    # the real machine answers something sensible, without torch
    monkeypatch.undo()
    d = catalog.device_memory()
    assert d.name and (d.total_bytes or 0) > 0


@pytest.mark.slow
def test_catalog_imports_no_torch():
    import subprocess

    code = ("import sys, engine.hub.catalog, engine.hub.download, engine.hub.resolve; engine.hub.catalog.device_memory(); "
            "engine.hub.catalog.model_rows(); print('torch' in sys.modules)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       cwd=Path(__file__).resolve().parents[3], timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "False"


# ---- download sizes ---------------------------------------------------------------------------
@pytest.fixture
def hub(monkeypatch, tmp_path):
    h = FakeHub()
    install(h, monkeypatch, tmp_path)
    return h


def test_download_size_from_the_hub_counts_only_what_pull_fetches(hub):
    hub.add(MEDUSA, {"config.json": b"{}" * 10, "model.safetensors": b"w" * 3000, "README.md": b"r" * 500,
                     "original/consolidated.00.pth": b"p" * 4000, "tokenizer.json": b"t" * 100})
    assert catalog.download_size(MEDUSA) == (20 + 3000 + 100, "hub")
    assert any("blobs=True" in s.url or "blobs=true" in s.url for s in hub.log)
    # a Megatron repo: its .pt file counts
    hub.add(DMC, {"mp_rank_00/model_optim_rng.pt": b"m" * 2048, "README.md": b"r" * 10,
                  "latest_checkpointed_iteration.txt": b"release"})
    assert catalog.download_size(find(DMC)) == (2048 + 7, "hub")


def test_download_size_falls_back_to_the_catalog(hub, monkeypatch):
    # unknown on the hub / gated without a token: the catalog's figure
    assert catalog.download_size(MEDUSA) == (int(9.6e9), "catalog")
    hub.add("meta-llama/Llama-3.1-8B-Instruct", {"model.safetensors": b"x"}, gated=True)
    assert catalog.download_size("meta-llama/Llama-3.1-8B-Instruct") == (int(16.1e9), "catalog")
    assert catalog.download_size("nobody/nothing") == (None, "unknown")
    assert catalog.download_size("SmolLM2-135M-Instruct") == (0, "embedded")
    # offline mode: no request at all
    hub.add(MEDUSA, {"model.safetensors": b"w" * 10})
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    n = len(hub.log)
    assert catalog.download_size(MEDUSA) == (int(9.6e9), "catalog")
    assert len(hub.log) == n
    # network down
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", False)

    def down(request):
        raise httpx2.ConnectError("no route to host", request=request)

    from huggingface_hub.utils import _http
    monkeypatch.setattr(_http, "_GLOBAL_CLIENT_FACTORY",
                        lambda: httpx2.Client(transport=httpx2.MockTransport(down)))
    monkeypatch.setattr(_http, "_GLOBAL_CLIENT", None)
    assert catalog.download_size(MEDUSA) == (int(9.6e9), "catalog")


# ---- the model list and `chatapp models` ---------------------------------------------------------
def _cached_checkpoint(cache: str, repo_id: str, files: dict) -> Path:
    repo = Path(cache) / ("models--" + repo_id.replace("/", "--"))
    snap = repo / "snapshots" / "abc123"
    snap.mkdir(parents=True)
    for name, data in files.items():
        (snap / name).write_bytes(data) if isinstance(data, bytes) else (snap / name).write_text(data)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("abc123")
    return snap


def test_list_models_reads_cache_checkpoints(hub, tmp_path):
    from huggingface_hub import constants

    cfg = {"num_hidden_layers": 4, "num_attention_heads": 8, "num_key_value_heads": 2, "hidden_size": 256,
           "max_position_embeddings": 2048, "torch_dtype": "bfloat16"}
    snap = _cached_checkpoint(constants.HF_HUB_CACHE, "someone/small", {"config.json": json.dumps(cfg),
                                                                          "model.safetensors": b"\0" * 4000})
    models = {m.id: m for m in catalog.list_models()}
    assert [m.id for m in catalog.entries()] == list(models)[:len(catalog.entries())]
    small = models["someone/small"]
    assert small.local_path == str(snap) and small.downloaded and small.source == "cache"
    assert (small.num_layers, small.num_kv_heads, small.head_dim, small.max_context) == (4, 2, 32, 2048)
    assert small.format == "bf16" and small.params_b == pytest.approx(2000 / 1e9)
    assert not models[MEDUSA].downloaded
    est = catalog.estimate_for_device(small, 1024, DeviceMemory("GPU", 8 * GiB, 8 * GiB))
    assert est.kv_bytes == 2 * 4 * 2 * 32 * 2 * 1024 and est.verdict == "fits"


def test_chatapp_models_table_and_json(hub, monkeypatch, capsys):
    from chatapp.cli import main

    monkeypatch.setattr(catalog, "device_memory", lambda: DeviceMemory("NVIDIA H100 80GB HBM3", 78 * GiB, 80 * GiB))
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    assert "device: NVIDIA H100 80GB HBM3, 78.0 GiB free of 80.0 GiB" in out
    lines = out.splitlines()
    medusa = next(i for i, line in enumerate(lines) if line.startswith(MEDUSA))
    assert "fp8-modelopt+medusa" in lines[medusa] and "8B" in lines[medusa] and "9.6 GB" in lines[medusa]
    assert "fits" in lines[medusa] and "not downloaded" in lines[medusa]
    assert lines[medusa + 1].strip().startswith("needs ")
    big = next(i for i, line in enumerate(lines) if line.startswith(BIG))
    assert "won't fit" in lines[big] and "chatapp --remote" in lines[big + 1]
    assert main(["models", "--context", "131072", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["device"]["name"] == "NVIDIA H100 80GB HBM3"
    rows = {m["id"]: m for m in data["models"]}
    assert rows[MEDUSA]["estimate"]["context"] == 131072 and rows[MEDUSA]["estimate"]["verdict"] == "fits"
    assert rows[MEDUSA]["download_bytes"] == int(9.6e9) and rows[MEDUSA]["download_source"] == "catalog"
    assert rows[BIG]["estimate"]["verdict"] == "won't fit" and rows[BIG]["multi_gpu"]
    assert rows["SmolLM2-135M-Instruct"]["download_source"] == "embedded"
    # a small GPU and a long context: the reason names the KV cache
    monkeypatch.setattr(catalog, "device_memory", lambda: DeviceMemory("RTX 3060", 12 * GiB, 12 * GiB))
    assert main(["models", "--context", "131072"]) == 0
    out = capsys.readouterr().out.splitlines()
    medusa = next(i for i, line in enumerate(out) if line.startswith(MEDUSA))
    assert "won't fit" in out[medusa] and "KV cache" in out[medusa + 1]


def test_the_set_up_decides_the_kv_compression_and_the_weight_bytes():
    smol = find("SmolLM2-135M-Instruct")
    dmc = find("nvidia/Llama-2-7B-DMC-8x")
    # a DMC cache divides the KV cache by the model's compression; another decoding does not
    assert estimate_memory(dmc, 4096, decoding="medusa+dmc").kv_bytes == estimate_memory(dmc, 4096).kv_bytes
    assert estimate_memory(dmc, 4096, decoding="plain").kv_bytes == pytest.approx(
        estimate_memory(dmc, 4096, decoding="dmc").kv_bytes * dmc.kv_compression, rel=1e-3)
    # FP8 weights: a byte a weight, on a GPU and on the CPU (which computes 16-bit weights in fp32)
    for on_cpu in (False, True):
        full = estimate_memory(smol, 1024, on_cpu=on_cpu).weights_bytes
        assert estimate_memory(smol, 1024, on_cpu=on_cpu, quantize="fp8").weights_bytes < full / 1.9
