"""The tokenizer: streaming detokenization exact for multi-byte characters split across tokens and
for leading spaces; chat templates rendered as transformers renders them."""

import pytest

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
