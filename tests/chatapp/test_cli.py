"""The headless CLI: `chatapp run` (JSON and streaming), `chatapp models`."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # each runs the chatapp command in a subprocess

ROOT = Path(__file__).resolve().parents[2]


def chatapp(*args, env=None, timeout=300):
    return subprocess.run([sys.executable, "-m", "chatapp", *args], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})}, cwd=ROOT)


def test_run_json_answers_paris_offline(embedded_session):
    r = chatapp("run", "--prompt", "What is the capital of France?", "--json", "--device", "cpu",
                env={"HF_HUB_OFFLINE": "1"})
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert "Paris" in out["text"]
    expected = {"text", "token_ids", "n_prompt_tokens", "n_generated", "time_to_first_token_s",
                "decode_tokens_per_s", "steps", "accepted_per_step", "peak_memory_bytes", "device", "model",
                "decoding"}
    assert expected <= set(out)
    assert out["n_generated"] == len(out["token_ids"]) == out["steps"] == sum(out["accepted_per_step"])
    assert set(out["accepted_per_step"]) == {1}
    assert out["decoding"] == "plain" and out["device"] == "cpu" and out["model"] == "SmolLM2-135M-Instruct"
    assert out["time_to_first_token_s"] > 0 and out["decode_tokens_per_s"] > 0 and out["peak_memory_bytes"] > 0
    assert out["n_prompt_tokens"] > 10


def test_run_options_and_streaming(tiny_checkpoint):
    r = chatapp("run", "--model", str(tiny_checkpoint), "--prompt", "hello", "--system", "Be brief.",
                "--max-new-tokens", "7", "--ignore-eos", "--temperature", "0.8", "--top-p", "0.9", "--seed", "3",
                "--json")
    assert r.returncode == 0, r.stderr
    a = json.loads(r.stdout)
    assert a["n_generated"] == 7
    again = json.loads(chatapp("run", "--model", str(tiny_checkpoint), "--prompt", "hello", "--system",
                               "Be brief.", "--max-new-tokens", "7", "--ignore-eos", "--temperature", "0.8",
                               "--top-p", "0.9", "--seed", "3", "--json").stdout)
    assert again["token_ids"] == a["token_ids"]
    # without --json the reply is streamed to stdout as plain text, the figures go to stderr
    r = chatapp("run", "--model", str(tiny_checkpoint), "--prompt", "hello", "--max-new-tokens", "5",
                "--ignore-eos")
    assert r.returncode == 0
    assert not r.stdout.lstrip().startswith("{")
    assert "tok/s" in r.stderr


def test_models_lists_catalog_and_embedded(embedded_session):
    r = chatapp("models")
    assert r.returncode == 0, r.stderr
    assert "SmolLM2-135M-Instruct" in r.stdout and str(embedded_session.path) in r.stdout
    for model_id in ("nvidia/Llama-3.1-8B-Medusa-FP8", "neuralmagic/Sparse-Llama-3.1-8B-gsm8k-2of4-FP8-dynamic",
                     "nvidia/Llama-3.1-405B-Instruct-FP8", "nvidia/Llama-2-7B-DMC-8x"):
        assert model_id in r.stdout


def test_models_finds_the_hugging_face_cache(tmp_path, tiny_checkpoint):
    """A model in HF_HUB_CACHE (the layout huggingface_hub writes) is listed and loadable by id."""
    import shutil

    repo = tmp_path / "hub" / "models--someone--tiny-llama"
    snap = repo / "snapshots" / "abc123"
    shutil.copytree(tiny_checkpoint, snap)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("abc123")
    env = {"HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"}
    r = chatapp("models", env=env)
    assert "someone/tiny-llama" in r.stdout
    r = chatapp("run", "--model", "someone/tiny-llama", "--prompt", "hi", "--max-new-tokens", "3", "--json",
                env=env)
    assert r.returncode == 0, r.stderr
    r = chatapp("run", "--model", "someone/absent", "--prompt", "hi", env=env)
    assert r.returncode == 1 and "'someone/absent' is not downloaded" in r.stderr
