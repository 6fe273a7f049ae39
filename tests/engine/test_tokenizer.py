"""The tokenizer: streaming detokenization exact for multi-byte characters split across tokens and
for leading spaces; chat templates rendered as transformers renders them."""

import pytest

from engine.errors import EngineError

TEXTS = [
    "Hello 👋 world 🌍🚀!",
    "日本語のテキストと中文字符，还有한국어.",
    "  two leading spaces, then\n\n  indented lines",
    " a single leading space",
    "mixed: café naïve — “quotes” ✓ 🧑‍🚀",
]


@pytest.mark.parametrize("text", TEXTS)
def test_stream_pieces_rebuild_the_text(embedded_session, text):
    tok = embedded_session.tokenizer
    ids = tok.encode(text)
    stream = tok.stream()
    pieces = [stream.step(i) for i in ids]
    assert "".join(pieces) == text
    assert "".join(pieces) == tok.decode(ids)
    # no piece carries half a character
    for p in pieces:
        p.encode("utf-8")
    assert "\ufffd" not in "".join(pieces)


def test_some_emoji_span_several_tokens(embedded_session):
    """The test above is only meaningful if characters really are split across tokens."""
    tok = embedded_session.tokenizer
    ids = tok.encode("🧑‍🚀")
    stream = tok.stream()
    assert len(ids) > 1
    assert [stream.step(i) for i in ids].count("") >= 1


CONVERSATIONS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "You answer in French."},
     {"role": "user", "content": "Hello!"},
     {"role": "assistant", "content": "Bonjour ! 😊"},
     {"role": "user", "content": "日本はどこ?"}],
]


@pytest.mark.parametrize("messages", CONVERSATIONS)
def test_chat_template_matches_transformers(embedded_session, messages):
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(embedded_session.path))
    expected = hf.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    expected = expected["input_ids"] if hasattr(expected, "keys") else expected
    assert embedded_session.tokenizer.encode_chat(messages) == list(expected)
    assert embedded_session.tokenizer.eos_ids == {hf.eos_token_id}


def _with_template(tiny_checkpoint, template: str):
    from engine.config import load_config
    from engine.tokenizer import ChatTokenizer

    (tiny_checkpoint / "chat_template.jinja").write_text(template)
    return ChatTokenizer(tiny_checkpoint, load_config(tiny_checkpoint))


@pytest.mark.parametrize("template, message", [
    ("{% for i in range(100000) %}{% for j in range(100000) %}{% for k in range(100000) %}"
     "{% endfor %}{% endfor %}{% endfor %}", "loops too long"),
    ("{{ range(10**8) | list | length }}", "a range of 100,000,000 items"),
    ("{{ 'a' * 300000000 }}", "builds a value of 300,000,000 items"),
    ("{{ 9 ** 999999 }}", "raises a number to the power 999999"),
    ("{% set ns = namespace(x='ab') %}{% for i in range(40) %}{% set ns.x = ns.x ~ ns.x %}{% endfor %}{{ ns.x }}",
     "builds a value of"),
    ("{% for i in range(900000) %}{{ 'abcdefghijklmnopqrstuvwxyz' }}{% endfor %}", "writes too much"),
])
def test_a_chat_template_renders_within_a_budget(tiny_checkpoint, template, message):
    import time

    tok = _with_template(tiny_checkpoint, template)
    t0 = time.monotonic()
    with pytest.raises(EngineError) as info:
        tok.encode_chat([{"role": "user", "content": "hi"}])
    assert time.monotonic() - t0 < 30 and message in str(info.value) and "\n" not in str(info.value)


def test_a_template_file_is_read_with_a_size_cap(tiny_checkpoint):
    from engine.config import load_config
    from engine.tokenizer import ChatTokenizer

    (tiny_checkpoint / "chat_template.jinja").unlink()
    (tiny_checkpoint / "chat_template.jinja").symlink_to("/dev/zero")
    with pytest.raises(EngineError, match="larger than a chat template may be"):
        ChatTokenizer(tiny_checkpoint, load_config(tiny_checkpoint))


def test_a_tokenizer_config_that_is_not_an_object_is_a_clear_error(tiny_checkpoint):
    from engine.config import load_config
    from engine.tokenizer import ChatTokenizer

    (tiny_checkpoint / "tokenizer_config.json").write_text("[1, 2]")
    with pytest.raises(EngineError, match="tokenizer_config.json: expected a JSON object"):
        ChatTokenizer(tiny_checkpoint, load_config(tiny_checkpoint))
