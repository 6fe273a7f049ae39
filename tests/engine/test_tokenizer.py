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
    ("{{ 'a' * 300000000 }}", "builds a value of 300,000,000 characters"),
    ("{{ 9 ** 999999 }}", "raises a number to the power 999999"),
    ("{% set ns = namespace(x='ab') %}{% for i in range(40) %}{% set ns.x = ns.x ~ ns.x %}{% endfor %}{{ ns.x }}",
     "builds a value of"),
    ("{% for i in range(900000) %}{{ 'abcdefghijklmnopqrstuvwxyz' }}{% endfor %}", "writes too much"),
    # the same growth without a loop or a namespace: each step doubles a value that is never written
    ("{% set a = 'a' * 10000000 %}" + "".join(f"{{% set a = a ~ a %}}" for _ in range(30)) + "{{ a | length }}",
     "builds a value of 20,000,000 characters"),
    ("{% set a = 'a' * 10000000 %}" + "".join(f"{{% set a = a + a %}}" for _ in range(30)) + "{{ a | length }}",
     "builds a value of 20,000,000 characters"),
    ("{% set a = ['aaaaaaaaaa'] * 1000000 %}{% set b = [a] * 1000000 %}{{ b | join | length }}", "builds a value"),
    ("{% set a = ['x' * 1000000] * 10 %}{{ (a * 2) | join | length }}", "builds a value"),
    ("{% set a = ['x' * 1000000] * 10 %}{{ ', '.join(a * 2) | length }}", "builds a value"),
    ("{{ ('a' * 10000000) | replace('a', 'bb') | length }}", "builds a value of 20,000,000 characters"),
    ("{{ ('a' * 100) | replace('', 'b' * 1000000) | length }}", "builds a value"),
    ("{{ 'x'.ljust(10**9) | length }}", "builds a value of 1,000,000,000 characters"),
    ("{{ 'x'.center(10**9) | length }}", "builds a value"),
    ("{{ 'x' | center(10**9) | length }}", "builds a value"),
    ("{{ '{:>999999999}'.format(1) | length }}", "builds a value"),
    ("{{ '%999999999d' | format(1) | length }}", "formats a value"),
    ("{{ ('%0*d' % (999999999, 1)) | length }}", "formats a value"),
    ("{{ ('a\n' * 5000000) | indent(10) | length }}", "builds a value"),
    ("{% set n = 9 ** 4000 %}{% set n = n * n %}{% set n = n * n %}{% set n = n * n %}{% set n = n * n %}"
     "{% set n = n * n %}{{ n % 7 }}", "multiplies numbers"),
    ("{% for c in 'a' * 16000000 %}{% endfor %}", "loops too long"),
    ("{{ [1] | batch(10**9, 0) | list | length }}", "builds a value"),
    ("{{ [1] | slice(10**9) | list | length }}", "asks for 1,000,000,000 slices"),
    ("{% set a = [['x' * 1000000] * 10] * 10 %}{{ a | sum(start=[]) | join | length }}", "builds a value"),
    ("{% set a = ['x' * 1000000] * 10 %}{{ ([a] * 100) | string | length }}", "builds a value"),
    ("{% set a = ['x' * 1000000] * 10 %}{{ ([a] * 100) | tojson | length }}", "builds a value"),
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


# The constructs published chat templates use (Llama 3.1's, Mistral's, ChatML): loops with loop
# variables, slicing, namespace, ~ and + on strings, tojson, trim, join, replace, %-format, macros.
PUBLISHED_CONSTRUCTS = """{{- bos_token }}
{%- macro line(role, text) -%}<|{{ role }}|>{{ text | trim }}{{ '\\n' }}{%- endmacro -%}
{%- set ns = namespace(system='', count=0) %}
{%- if messages[0]['role'] == 'system' %}{% set ns.system = messages[0]['content'] | trim %}
{%- set loop_messages = messages[1:] %}{% else %}{% set loop_messages = messages %}{% endif %}
{{- 'System: ' ~ (ns.system or 'none') ~ '\\n' }}
{%- for message in loop_messages %}
{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}{{ raise_exception('roles must alternate') }}{% endif %}
{%- set ns.count = ns.count + 1 %}
{{- line(message['role'], message['content']) }}{% if loop.last %}[{{ loop.length }} of {{ ns.count }}]{% endif %}
{%- endfor %}
{{- {'n': loop_messages | length, 'roles': loop_messages | map(attribute='role') | list} | tojson }}
{{- ', '.join(['a', 'b']) + ('%s-%03d' % ('x', 7)) + ('x' * 3) + ('{}!'.format('hi')) + ('a b' | replace(' ', '_')) }}
{%- if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"""


@pytest.mark.parametrize("messages", [
    [{"role": "user", "content": "hi "}],
    [{"role": "system", "content": " be brief "}, {"role": "user", "content": "a"},
     {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}],
])
def test_the_budget_changes_nothing_a_published_template_renders(tiny_checkpoint, messages):
    from transformers.utils.chat_template_utils import render_jinja_template

    tok = _with_template(tiny_checkpoint, PUBLISHED_CONSTRUCTS)
    rendered, _ = render_jinja_template([messages], chat_template=PUBLISHED_CONSTRUCTS, add_generation_prompt=True,
                                        bos_token=tok.bos_token, eos_token=tok.eos_token)
    assert tok.render_chat(messages) == rendered[0]
    with pytest.raises(EngineError, match="roles must alternate"):
        tok.render_chat([{"role": "assistant", "content": "x"}])
