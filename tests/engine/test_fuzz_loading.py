"""Random byte flips of a small checkpoint's files (safetensors, config, tokenizer, chat template,
generation config) and of a small GGUF file, fed to the loader: each one either loads and
generates, or fails with one line from the engine (an EngineError) that names what it read. The
cases are seeded (the same ones every run), bounded in count and in time."""

import random
import shutil
import struct
import time
import traceback

import pytest

from engine.errors import EngineError
from engine.events import LoadModel, SamplingParams
from engine.hub import embedded
from engine.session import Session
from fakes.checkpoints import write_tiny_checkpoint, write_tiny_gguf

CASES_PER_FILE = 16
TIME_PER_FILE_S = 25.0  # a bound, not a target: the cases left when it is spent are skipped
FILES = ("model.safetensors", "config.json", "tokenizer.json", "tokenizer_config.json", "generation_config.json",
         "chat_template.jinja")


# Most changes write a character that keeps JSON (and a safetensors header) parseable, so that the
# values behind the parser are reached too: other numbers, signs, exponents, nesting, names.
STRUCTURAL = b'0123456789-+.eE"{}[],:ntf '


def flip(data: bytes, rng: random.Random, header: int) -> tuple[bytes, list[int]]:
    """``data`` with 1 to 16 bytes changed, most of them in the first ``header`` bytes (all of it
    when 0), most of them to a JSON character, the rest to any byte."""
    out = bytearray(data)
    spots = []
    for _ in range(rng.choice((1, 2, 4, 16))):
        i = rng.randrange(header or len(out)) if rng.random() < 0.75 else rng.randrange(len(out))
        out[i] = rng.choice(STRUCTURAL) if rng.random() < 0.75 else rng.randrange(256)
        spots.append(i)
    return bytes(out), spots


def outcome(load, where: str) -> str:
    """'ok', or the engine's one-line error; anything else fails the test with the case in it."""
    try:
        session = load()
        try:
            for _ in session.generate([{"role": "user", "content": "hi"}], SamplingParams(max_new_tokens=2)):
                pass
        finally:
            session.close()
        return "ok"
    except EngineError as e:
        message = str(e)
        assert message and "\n" not in message, f"{where}: a message of more than one line: {message!r}"
        return message
    except BaseException as e:  # noqa: BLE001 - what the test is for
        pytest.fail(f"{where}: {type(e).__name__} escaped the loader: {e}\n{traceback.format_exc()}")


@pytest.fixture(scope="module")
def pristine(tmp_path_factory, embedded_session):
    return write_tiny_checkpoint(tmp_path_factory.mktemp("fuzz") / "tiny", embedded_session.path)


@pytest.mark.parametrize("name", FILES)
def test_byte_flips_of_a_checkpoint_file(pristine, tmp_path, name):
    rng = random.Random(f"chatapp-fuzz-{name}")
    data = (pristine / name).read_bytes()
    header = 8 + struct.unpack("<Q", data[:8])[0] if name.endswith(".safetensors") else 0
    seen, t0 = [], time.monotonic()
    for case in range(CASES_PER_FILE):
        if time.monotonic() - t0 > TIME_PER_FILE_S:
            break
        folder = tmp_path / f"case{case}"
        shutil.copytree(pristine, folder)
        damaged, spots = flip(data, rng, header)
        (folder / name).write_bytes(damaged)
        result = outcome(lambda: Session.load(LoadModel(model=str(folder), device="cpu")),
                         f"{name} with bytes {spots} changed")
        if result != "ok":
            assert str(folder) in result, result  # names the file (or the folder, for a missing key)
        seen.append(result)
        shutil.rmtree(folder)
    assert seen  # at least one case ran


def test_byte_flips_of_a_gguf_file(tmp_path_factory, monkeypatch):
    source = tmp_path_factory.mktemp("gguf") / embedded.GGUF_NAME
    write_tiny_gguf(source, embedded.gguf_path())
    data = source.read_bytes()
    tensors_at = data.find(b"token_embd.weight")  # the metadata (tokenizer, sizes) comes before the tensor infos
    rng = random.Random("chatapp-fuzz-gguf")
    damaged_file = source.with_name("damaged") / embedded.GGUF_NAME
    damaged_file.parent.mkdir()
    monkeypatch.setattr(embedded, "gguf_path", lambda: damaged_file)
    t0 = time.monotonic()
    for case in range(2 * CASES_PER_FILE):
        if time.monotonic() - t0 > 2 * TIME_PER_FILE_S:
            break
        damaged, spots = flip(data, rng, tensors_at + 2000)
        damaged_file.write_bytes(damaged)
        target = tmp_path_factory.mktemp("converted") / "model"
        monkeypatch.setattr(embedded, "converted_dir", lambda target=target: target)
        result = outcome(lambda: Session.load(LoadModel(model=None, device="cpu")),
                         f"the GGUF file with bytes {spots} changed")
        if result != "ok":
            assert str(damaged_file) in result or str(target) in result, result
        assert not target.with_name("model.partial").exists()
