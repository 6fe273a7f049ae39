"""settings.toml: defaults, round trips, and one-line errors that name the file and the key."""

import os

import pytest

from chatapp.store.settings import (ChatSettings, ModelSettings, RemoteServer, SamplingSettings, Settings,
                                    SettingsError, UISettings, keep_invalid, load_settings, read_settings,
                                    save_settings)
from engine.events import SamplingParams
from engine.paths import config_dir


@pytest.fixture
def path(tmp_path):
    return tmp_path / "settings.toml"


def full_settings() -> Settings:
    return Settings(
        model=ModelSettings(default="HuggingFaceTB/SmolLM2-360M-Instruct", device="cuda", quantize="fp8",
                            decoding="medusa", context=4096),
        sampling=SamplingSettings(temperature=0.7, top_p=0.95, top_k=40, max_new_tokens=1024, seed=1234),
        chat=ChatSettings(system_prompt='You are "terse".\nAnswer in one line.\n\tTabs, \\backslashes\\ too. é 中'),
        ui=UISettings(theme="nord", show_stats=False),
        remote=[RemoteServer(name="lab", url="http://gpu-box:8000/v1", model="llama-3.1-8b", api_key_env="LAB_KEY"),
                RemoteServer(name="local", url="https://localhost:8443/v1")],
    )


def test_missing_file_gives_defaults(path):
    s = load_settings(path)
    assert s == Settings()
    assert s.model.default is None and s.model.decoding == "plain"
    assert s.ui.theme == "textual-dark" and s.ui.show_stats is True and s.remote == []


def test_sampling_left_out_is_the_models_recommendation():
    assert SamplingSettings().to_dict() == {}  # the chat sends no params: the model's generation_config
    assert SamplingSettings(temperature=0.7, seed=3).to_dict() == {"temperature": 0.7, "seed": 3}
    assert SamplingParams(**SamplingSettings(top_k=5).to_dict()) == SamplingParams(top_k=5)


def test_default_path_honours_config_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("CHATAPP_CONFIG_DIR", str(tmp_path / "conf"))
    assert config_dir() == tmp_path / "conf"
    written = save_settings(full_settings())
    assert written == tmp_path / "conf" / "settings.toml" and written.exists()
    assert load_settings() == full_settings()


def test_round_trip(path):
    save_settings(full_settings(), path)
    assert load_settings(path) == full_settings()
    text = path.read_text()
    assert "[[remote]]" in text and '"""' in text  # the prompt reads as a block


def test_round_trip_defaults_and_none(path):
    save_settings(Settings(), path)
    assert load_settings(path) == Settings()
    assert "default" not in path.read_text()  # None is written by leaving the key out


def test_round_trip_carriage_returns(path):
    s = Settings(chat=ChatSettings(system_prompt="line one\r\nline two\r"))
    save_settings(s, path)
    assert load_settings(path) == s


def test_partial_file_fills_in_defaults(path):
    path.write_text('[sampling]\ntemperature = 1\n\n[ui]\nshow_stats = false\n')
    s = load_settings(path)
    assert s.sampling.temperature == 1.0 and isinstance(s.sampling.temperature, float)
    assert s.sampling.top_p is None and s.ui.show_stats is False and s.ui.theme == "textual-dark"


def test_save_is_atomic_keeps_mode_and_a_backup(path):
    save_settings(Settings(), path)
    assert [p.name for p in path.parent.iterdir()] == ["settings.toml"]  # no temp file left, nothing to back up
    os.chmod(path, 0o640)
    before = path.read_bytes()
    save_settings(full_settings(), path)
    assert path.stat().st_mode & 0o777 == 0o640
    assert sorted(p.name for p in path.parent.iterdir()) == ["settings.toml", "settings.toml.bak"]
    backup = path.with_name("settings.toml.bak")
    assert backup.read_bytes() == before and backup.stat().st_mode & 0o777 == 0o640


BAD_CONTEXT = """# mine
[model]
context = "big"
decoding = "medusa"

[chat]
system_prompt = "Answer like a pirate."

[[remote]]
name = "lab"
url = "http://gpu-box:8000/v1"

[[remote]]
name = "broken"
url = "ftp://nowhere"
"""


def test_read_settings_keeps_every_valid_value(path):
    path.write_text(BAD_CONTEXT)
    s, problems = read_settings(path)
    assert s.model.context is None and s.model.decoding == "medusa"
    assert s.chat.system_prompt == "Answer like a pirate."
    assert s.remote == [RemoteServer(name="lab", url="http://gpu-box:8000/v1")]
    assert problems == [f"{path}: [model] context: expected an integer ≥ 1, got 'big'",
                        f"{path}: [[remote]] #2 url: expected an http:// or https:// URL, got 'ftp://nowhere'"]
    with pytest.raises(SettingsError, match=r"\[model\] context"):
        load_settings(path)  # the strict reading still names the first problem


@pytest.mark.parametrize("text", [BAD_CONTEXT, "[sampling\nnot toml", "[colours]\nbg = 1\n"])
def test_a_file_with_errors_is_never_written_over(path, text):
    path.write_text(text)
    s, _ = read_settings(path)
    s.ui.theme = "nord"
    save_settings(s, path)
    assert path.with_name("settings.toml.bad").read_text() == text  # the user's file, whole
    again = load_settings(path)
    assert again == s and again.ui.theme == "nord"
    path.write_text(text)
    save_settings(s, path)  # a second broken file does not replace the first one kept
    assert path.with_name("settings.toml.bad.1").read_text() == text
    assert keep_invalid(path) is None  # the file now loads


def test_keep_invalid_leaves_a_good_file_and_no_file_alone(path):
    assert keep_invalid(path) is None and not path.exists()
    save_settings(full_settings(), path)
    assert keep_invalid(path) is None and load_settings(path) == full_settings()


def test_save_refuses_bad_values_and_keeps_the_old_file(path):
    save_settings(full_settings(), path)
    before = path.read_bytes()
    bad = full_settings()
    bad.sampling.top_p = 2.0
    with pytest.raises(SettingsError, match=r"\[sampling\] top_p"):
        save_settings(bad, path)
    assert path.read_bytes() == before


@pytest.mark.parametrize("text, where, what", [
    ('[sampling]\ntemperature = "hot"\n', "[sampling] temperature", "expected a number ≥ 0, got 'hot'"),
    ("[sampling]\ntemperature = -0.5\n", "[sampling] temperature", "got -0.5"),
    ("[sampling]\ntemperature = nan\n", "[sampling] temperature", "expected a number"),
    ("[sampling]\ntop_p = 0\n", "[sampling] top_p", "expected a number in (0, 1], got 0"),
    ("[sampling]\ntop_p = 1.5\n", "[sampling] top_p", "got 1.5"),
    ("[sampling]\ntop_k = 2.5\n", "[sampling] top_k", "expected an integer ≥ 0, got 2.5"),
    ("[sampling]\nmax_new_tokens = 0\n", "[sampling] max_new_tokens", "expected an integer ≥ 1"),
    ("[sampling]\nseed = true\n", "[sampling] seed", "got true"),
    ('[model]\ndecoding = "fast"\n', "[model] decoding", "expected one of 'plain', 'medusa', 'lookup', 'medusa+lookup', 'dmc', 'medusa+dmc', 'lookup+dmc', 'medusa+lookup+dmc', got 'fast'"),
    ('[model]\ndevice = "tpu"\n', "[model] device", "got 'tpu'"),
    ('[model]\nquantize = "int4"\n', "[model] quantize", "got 'int4'"),
    ("[model]\ncontext = -1\n", "[model] context", "expected an integer ≥ 1"),
    ('[model]\ndefault = ""\n', "[model] default", "expected a non-empty string"),
    ("[chat]\nsystem_prompt = 3\n", "[chat] system_prompt", "expected a string, got 3"),
    ('[ui]\nshow_stats = "yes"\n', "[ui] show_stats", "expected true or false, got 'yes'"),
    ("[ui]\ntheme = 1\n", "[ui] theme", "expected a non-empty string"),
    ('[ui]\ntheme = "no-such-theme"\n', "[ui] theme", "expected a theme name: ansi-dark, "),
    ("[sampling]\ntemprature = 0.5\n", "[sampling] temprature", "unknown key"),
    ("[colours]\nbg = 1\n", "[colours]", "unknown section"),
    ('model = "x"\n', "[model]", "expected a table, got 'x'"),
    ('[remote]\nname = "x"\n', "[[remote]]", "expected an array of tables"),
    ('[[remote]]\nname = "a"\n', "[[remote]] #1 url", "missing"),
    ('[[remote]]\nname = "a"\nurl = "ftp://x"\n', "[[remote]] #1 url", "expected an http:// or https:// URL"),
    ('[[remote]]\nname = "a"\nurl = "http://x"\n[[remote]]\nname = "b"\nurl = "http://y"\nkey = "k"\n',
     "[[remote]] #2 key", "unknown key"),
    ('[[remote]]\nname = "a"\nurl = "http://x"\n[[remote]]\nname = "a"\nurl = "http://y"\n',
     "[[remote]] #2 name", "used by an earlier"),
    ('[[remote]]\nname = "a"\nurl = "http://x"\napi_key_env = "MY KEY"\n', "[[remote]] #1 api_key_env",
     "expected an environment variable name"),
])
def test_errors_name_file_and_key(path, text, where, what):
    path.write_text(text)
    with pytest.raises(SettingsError) as info:
        load_settings(path)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"{path}: {where}: "), message
    assert what in message, message


def test_example_message(path):
    path.write_text('[sampling]\ntemperature = "hot"\n')
    with pytest.raises(SettingsError) as info:
        load_settings(path)
    assert str(info.value) == f"{path}: [sampling] temperature: expected a number ≥ 0, got 'hot'"


def test_invalid_toml(path):
    path.write_text("[sampling\ntemperature = 0.5\n")
    with pytest.raises(SettingsError) as info:
        load_settings(path)
    message = str(info.value)
    assert message.startswith(f"{path}: invalid TOML") and "line 1" in message and "\n" not in message


def test_not_utf8(path):
    path.write_bytes(b'[chat]\nsystem_prompt = "\xff"\n')
    with pytest.raises(SettingsError, match="not UTF-8"):
        load_settings(path)


def test_unreadable(tmp_path):
    folder = tmp_path / "settings.toml"
    folder.mkdir()  # a folder where the file should be
    with pytest.raises(SettingsError, match="cannot read"):
        load_settings(folder)
