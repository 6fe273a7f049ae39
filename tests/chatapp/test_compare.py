"""Compare mode: set-up specs, the figures, the compare screen (scripted engine) and one real
headless run on the embedded model."""

from __future__ import annotations

import json
import threading
from contextlib import asynccontextmanager

import pytest
from textual.app import App

from chatapp.tui.compare import CompareScreen, ComparePane
from engine.serving.client import EngineClient
from chatapp.compare.figures import compare_figures, first_difference, identical_text, speedup, summary
from engine.errors import EngineError
from engine.events import Generate, GenerationStats, LoadModel, SamplingParams
from chatapp.compare.spec import parse_setup
from fakes.engine import FakeWorker, wait_for

SIZE = (120, 40)


# ---- set-up specs ----------------------------------------------------------------------------
def test_parse_plain_default_greedy():
    s = parse_setup("plain")
    assert s.label == "plain"
    assert s.load == LoadModel(model=None, device=None, context=None, quantize=None, decoding="plain")
    assert s.params == SamplingParams(max_new_tokens=256, temperature=0.0)
    assert s.greedy


def test_parse_medusa_fp8_with_defaults():
    s = parse_setup(" Medusa , fp8 ", model="/m", device="cuda", context=4096, max_new_tokens=64)
    assert s.label == "medusa,fp8"
    assert s.load == LoadModel(model="/m", device="cuda", context=4096, quantize="fp8", decoding="medusa")
    assert s.params.max_new_tokens == 64


def test_parse_model_sampling_and_choices():
    s = parse_setup("model=meta-llama/Llama-3.1-8B-Instruct,plain", model="other")
    assert s.load.model == "meta-llama/Llama-3.1-8B-Instruct" and s.load.decoding == "plain"
    assert s.label == "plain,model=meta-llama/Llama-3.1-8B-Instruct"

    s = parse_setup("plain,temperature=0.8,seed=1,top_p=0.9,top_k=40,max_new_tokens=12")
    assert s.params == SamplingParams(max_new_tokens=12, temperature=0.8, top_k=40, top_p=0.9, seed=1)
    assert not s.greedy
    assert s.label == "plain,temperature=0.8,top_p=0.9,top_k=40,seed=1,max_new_tokens=12"

    s = parse_setup("medusa-choices=card,medusa,stored")
    assert s.load.medusa_choices == "card" and s.load.quantize is None and s.label == "medusa,medusa-choices=card"
    s = parse_setup("bf16,medusa")  # weights converted to bf16 on load
    assert s.load.quantize == "bf16" and s.label == "medusa,bf16"
    assert parse_setup("fp8").label == "plain,fp8"  # the decoding defaults to plain
    # set-ups compose: a proposer over a cache, on any weights, in any order of terms
    for spec in ("medusa,dmc", "dmc,medusa", "dmc,fp8", "fp8,dmc,medusa", "medusa,dmc,fp8,medusa-choices=card"):
        s = parse_setup(spec)
        assert s.load.decoding == ("medusa+dmc" if "medusa" in spec else "dmc")
        assert s.load.quantize == ("fp8" if "fp8" in spec else None)
        assert s.label.startswith("medusa,dmc" if "medusa" in spec else "dmc")
    assert parse_setup("medusa,dmc,fp8").label == "medusa,dmc,fp8"


@pytest.mark.parametrize("spec, words", [
    ("medusa,fp9", ["compare set-up 'medusa,fp9': unknown term 'fp9'", "expected plain, medusa, lookup, dmc, fp8, bf16, stored",
                    "max_new_tokens"]),
    ("", ["is empty"]),
    ("plain,medusa", ["plain is a decoding of its own"]),
    ("fp8,bf16", ["two weight formats"]),
    ("plain,colour=red", ["unknown key 'colour'"]),
    ("plain,temperature=hot", ["temperature='hot' is not a number"]),
    ("plain,temperature=-1", ["temperature=-1 must be at least 0"]),
    ("plain,top_p=0", ["top_p=0 must be in (0, 1]"]),
    ("plain,top_k=2.5", ["top_k='2.5' is not an integer"]),
    ("plain,max_new_tokens=0", ["max_new_tokens=0 must be at least 1"]),
    ("plain,model=", ["model has no value"]),
    ("plain,seed=1,seed=2", ["seed is given twice"]),
    ("plain,medusa-choices=card", ["medusa-choices applies to medusa decoding only"]),
])
def test_parse_bad_specs(spec, words):
    with pytest.raises(EngineError) as e:
        parse_setup(spec)
    for w in words:
        assert w in str(e.value), str(e.value)
    assert "\n" not in str(e.value)


# ---- figures ---------------------------------------------------------------------------------
def stats(**kw) -> GenerationStats:
    base = dict(text="one two three", token_ids=[1, 2, 3], n_prompt_tokens=5, n_generated=3,
                time_to_first_token_s=0.5, decode_tokens_per_s=20.0, steps=3, accepted_per_step=[1, 1, 1],
                peak_memory_bytes=2 * 2**30, device="cuda", model="m", decoding="plain",
                kv_cache_bytes=3 * 2**20, kv_cache_bytes_dense=3 * 2**20, kv_compression=1.0)
    return GenerationStats(**{**base, **kw})


def test_figures_speedup_and_identical():
    a = stats()
    b = stats(decode_tokens_per_s=28.6, steps=2, accepted_per_step=[2, 1], time_to_first_token_s=0.25,
              decoding="medusa", kv_cache_bytes=2**20, kv_compression=3.0, peak_memory_bytes=3 * 2**30)
    rows = {r[0]: r[1:] for r in compare_figures(a, b, greedy=True)}
    assert rows["decode tok/s"] == ("20.0", "28.6", "1.43x")
    assert rows["time to first token"] == ("0.50 s", "0.25 s", "0.50x")
    assert rows["tokens generated"] == ("3", "3", "1.00x")
    assert rows["steps"] == ("3", "2", "0.67x")
    assert rows["tokens per step"] == ("1.00", "1.50", "1.50x")
    assert rows["KV cache"] == ("3.0 MiB", "1.0 MiB", "0.33x")
    assert rows["KV compression"] == ("1.00x", "3.00x", "3.00x")
    assert rows["peak memory"] == ("2.0 GiB", "3.0 GiB", "1.50x")
    assert rows["same text"][2] == "identical"
    assert speedup(a, b) == pytest.approx(1.43)
    assert identical_text(a, b, True) is True
    assert identical_text(a, b, False) is None
    assert summary(a, b, True) == "B is 1.43x faster than A · greedy texts identical"
    assert summary(b, a, False) == "A is 1.43x faster than B · sampling: texts not compared"


def test_figures_differing_and_missing():
    a = stats()
    b = stats(text="one two four", token_ids=[1, 2, 4])
    assert identical_text(a, b, True) is False
    assert first_difference(a, b) == 2
    assert summary(a, b, True) == "B is 1.00x faster than A · greedy texts differ at token 3"
    assert {r[0]: r[3] for r in compare_figures(a, b, True)}["same text"] == "differ at token 3"
    # another model (tokenizer): where they part cannot be told
    assert first_difference(a, stats(text="x", token_ids=[1, 2, 4], model="other")) is None
    # one is a prefix of the other
    assert first_difference(a, stats(text="one two", token_ids=[1, 2])) == 2

    rows = compare_figures(a, None, True)
    assert rows[0] == ("decode tok/s", "20.0", "—", "—")
    assert speedup(a, None) is None and speedup(stats(decode_tokens_per_s=0.0), a) is None
    assert identical_text(a, None, True) is None
    assert summary(a, None, True) == "no comparison: B failed"
    assert compare_figures(None, None, True)[0] == ("decode tok/s", "—", "—", "—")


# ---- the compare screen (scripted engine) ----------------------------------------------------
class _App(App):
    def __init__(self, screen: CompareScreen):
        super().__init__()
        self.screen_under_test = screen
        self.dismissed: list = []

    def on_mount(self) -> None:
        self.push_screen(self.screen_under_test, callback=self.dismissed.append)


def make(fake: FakeWorker, a: str = "plain", b: str = "medusa", prompt: str | None = "hi", max_new_tokens: int = 12,
         **kw):
    screen = CompareScreen(EngineClient(fake), parse_setup(a, max_new_tokens=max_new_tokens),
                           parse_setup(b, max_new_tokens=max_new_tokens), prompt, **kw)
    return _App(screen), screen


def header(screen, key: str) -> str:
    return screen.pane(key).header.text


def table_rows(screen) -> dict[str, list[str]]:
    t = screen.table
    rows = [[str(c) for c in t.get_row_at(i)] for i in range(t.row_count)]
    return {r[0]: r[1:] for r in rows}


def finished(screen) -> bool:
    return not screen.running and all(screen.outcome[k] != "waiting" for k in ("a", "b"))


async def test_both_panes_stream_and_the_table_fills():
    gate = threading.Event()
    fake = FakeWorker(interval=0.02, per_decoding={
        "medusa": {"accepted": 3, "decode_tokens_per_s": 28.6, "load_gate": gate}})
    app, screen = make(fake)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.pause()
        assert screen.prompt_input.value == "hi"
        assert header(screen, "a") == "A: plain\nwaiting" and header(screen, "b") == "B: medusa\nwaiting"
        assert table_rows(screen)["decode tok/s"] == ["—", "—", "—"]
        await pilot.press("enter")
        await wait_for(pilot, lambda: screen.outcome["a"] == "done", 5, "A to finish")
        # A is done and its figures are in; B loads (held by the gate), marked as the running one
        await wait_for(pilot, lambda: "loading" in header(screen, "b"), 2, "B to load")
        assert header(screen, "b").startswith("▶ ") and screen.pane("b").has_class("-running")
        assert not header(screen, "a").startswith("▶") and "done · 19.5 tok/s" in header(screen, "a")
        assert "fake-model on cpu" in header(screen, "a")
        assert table_rows(screen)["decode tok/s"] == ["19.5", "—", "—"]
        assert "word11" in screen.pane("a").reply.source
        gate.set()

        await wait_for(pilot, lambda: finished(screen), 5, "B to finish")
        assert "done · 28.6 tok/s" in header(screen, "b")
        assert screen.pane("b").reply.source == screen.pane("a").reply.source == "".join(
            f"word{i} " for i in range(12))
        rows = table_rows(screen)
        assert rows["decode tok/s"] == ["19.5", "28.6", "1.47x"]
        assert rows["steps"] == ["12", "4", "0.33x"]
        assert rows["tokens per step"] == ["1.00", "3.00", "3.00x"]
        assert rows["same text"][2] == "identical"
        assert screen.summary_text == "B is 1.47x faster than A · greedy texts identical"
        assert screen.pane("a").body.scroll_y == 0  # a short reply shows from its top
        assert [r.decoding for r in fake.requests if isinstance(r, LoadModel)] == ["plain", "medusa"]
        assert [r.params.max_new_tokens for r in fake.requests if isinstance(r, Generate)] == [12, 12]
        assert fake.requests[1] == Generate([{"role": "user", "content": "hi"}], SamplingParams(max_new_tokens=12))

        await pilot.press("q")
        await wait_for(pilot, lambda: app.dismissed, 2, "the screen to close")
        assert app.dismissed == [True]


async def test_long_replies_keep_each_pane_at_the_bottom():
    fake = FakeWorker(interval=0.005, token="paragraph {}\n\n", per_decoding={"medusa": {"accepted": 4}})
    app, screen = make(fake, max_new_tokens=60)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("enter")
        await wait_for(pilot, lambda: finished(screen), 10, "the comparison")
        for key in ("a", "b"):
            body = screen.pane(key).body
            assert "paragraph 59" in screen.pane(key).reply.source
            await wait_for(pilot, lambda: body.scroll_y == body.max_scroll_y > 60, 2, f"pane {key} at the bottom")
        # a short reply in a re-run starts at the top again
        fake.max_tokens = 3
        await pilot.press("ctrl+r")
        await wait_for(pilot, lambda: finished(screen) and screen.outcome["b"] == "done", 5, "the re-run")
        tops = lambda: [screen.pane(k).body.scroll_y for k in ("a", "b")]  # noqa: E731
        await wait_for(pilot, lambda: tops() == [0, 0], 2, "both panes at the top")
        await pilot.pause(0.2)
        assert tops() == [0, 0]


async def test_error_of_one_setup_is_shown_and_the_other_completes():
    message = "SmolLM2-135M-Instruct: no DMC checkpoint or shipped DMC retrofit for this model"
    fake = FakeWorker(interval=0.01, per_decoding={"dmc": {"load_error": message}})
    app, screen = make(fake, a="dmc", b="plain")
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("enter")
        await wait_for(pilot, lambda: finished(screen), 5, "the comparison")
        assert screen.outcome == {"a": "error", "b": "done"}
        assert f"error: {message}" in header(screen, "a") and screen.pane("a").has_class("-error")
        assert screen.pane("a").errors == [message]
        assert "done · 19.5 tok/s" in header(screen, "b")
        assert table_rows(screen)["decode tok/s"] == ["—", "19.5", "—"]
        assert screen.summary_text == "no comparison: A failed"

    # an error while generating: the partial reply stays, the other set-up still runs
    fake = FakeWorker(interval=0.01, per_decoding={"plain": {"generate_error": "out of memory: boom"}})
    app, screen = make(fake, a="plain", b="medusa")
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("enter")
        await wait_for(pilot, lambda: finished(screen), 5, "the comparison")
        assert screen.outcome == {"a": "error", "b": "done"}
        assert "error: out of memory: boom" in header(screen, "a")
        assert screen.pane("a").reply.source == "word0 word1 word2 "
        assert screen.pane("a").errors == ["out of memory: boom"]


async def test_sampling_and_differing_texts():
    fake = FakeWorker(interval=0.01, per_decoding={"medusa": {"token": "other{} ", "accepted": 2}})
    app, screen = make(fake)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("enter")
        await wait_for(pilot, lambda: finished(screen), 5, "the comparison")
        assert screen.summary_text == "B is 1.00x faster than A · greedy texts differ at token 1"

    fake = FakeWorker(interval=0.01)
    app, screen = make(fake, a="plain,temperature=0.7,seed=1")
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("enter")
        await wait_for(pilot, lambda: finished(screen), 5, "the comparison")
        assert screen.summary_text.endswith("sampling: texts not compared")
        assert table_rows(screen)["same text"][2] == "not compared (sampling)"


async def test_escape_stops_and_ctrl_r_reruns():
    fake = FakeWorker(interval=0.05, max_tokens=400)
    app, screen = make(fake, max_new_tokens=400)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("enter")
        await wait_for(pilot, lambda: screen.pane("a").reply.source.count("word") >= 3, 5, "some tokens")
        await pilot.press("escape")
        await wait_for(pilot, lambda: not screen.running, 2, "the comparison to stop")
        assert screen.outcome == {"a": "cancelled", "b": "stopped"}
        assert "cancelled ·" in header(screen, "a") and "not run (stopped)" in header(screen, "b")
        partial = screen.pane("a").reply.source
        await pilot.pause(0.3)
        assert screen.pane("a").reply.source == partial and partial.count("word") < 400
        assert screen.summary_text == "stopped: no comparison"
        assert sum(isinstance(r, LoadModel) for r in fake.requests) == 1

        fake.max_tokens = 5
        await pilot.press("ctrl+r")
        await wait_for(pilot, lambda: finished(screen) and screen.outcome["b"] == "done", 5, "the re-run")
        assert screen.pane("a").reply.source == "word0 word1 word2 word3 word4 "
        assert screen.summary_text == "B is 1.00x faster than A · greedy texts identical"
        assert sum(isinstance(r, LoadModel) for r in fake.requests) == 3

        # ctrl+r while running starts again; a new prompt from the input
        fake.max_tokens = 400
        await pilot.press("ctrl+r")
        await wait_for(pilot, lambda: screen.running and "word2" in screen.pane("a").reply.source, 5, "tokens")
        screen.prompt_input.focus()
        screen.prompt_input.value = "again"
        await pilot.press("enter")
        await wait_for(pilot, lambda: screen.prompt_text == "again" and "word2" in screen.pane("a").reply.source,
                       5, "the new run")
        await pilot.press("ctrl+w")  # leaves even from the input (and stops the run)
        await wait_for(pilot, lambda: app.dismissed, 2, "the screen to close")
        assert app.dismissed == [True]
        assert fake.requests[-1].messages == [{"role": "user", "content": "again"}]


async def test_leaving_before_running_loaded_nothing():
    fake = FakeWorker()
    app, screen = make(fake, prompt=None)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.pause()
        assert screen.prompt_input.value == ""
        await pilot.press("enter")  # nothing to compare
        await pilot.pause(0.1)
        assert not screen.running and fake.requests == []
        await pilot.press("ctrl+w")
        await wait_for(pilot, lambda: app.dismissed, 2, "the screen to close")
        assert app.dismissed == [False]


async def test_autorun_starts_without_enter():
    fake = FakeWorker(interval=0.01, max_tokens=4)
    app, screen = make(fake, autorun=True)
    async with app.run_test(size=SIZE) as pilot:
        await wait_for(pilot, lambda: finished(screen), 5, "the comparison")
        assert screen.outcome == {"a": "done", "b": "done"}
        assert len(screen.query(ComparePane)) == 2


# ---- one real headless run on the embedded model ---------------------------------------------
def test_cli_compare_json_on_the_embedded_model(capsys):
    from chatapp.cli import main

    rc = main(["compare", "--a", "plain", "--b", "medusa", "--prompt", "Give me three tips for cooking rice.",
               "--max-new-tokens", "24", "--device", "cpu", "--json"])
    out = capsys.readouterr()
    assert rc == 0, out.err
    result = json.loads(out.out)
    assert result["identical"] is True
    a, b = result["a"], result["b"]
    assert a["label"] == "plain" and b["label"] == "medusa"
    assert a["decoding"] == "plain" and b["decoding"] == "medusa"
    assert a["n_generated"] == b["n_generated"] == 24
    assert a["text"] == b["text"] and a["token_ids"] == b["token_ids"]
    assert b["steps"] <= a["steps"] == 24
    assert result["speedup"] == pytest.approx(b["decode_tokens_per_s"] / a["decode_tokens_per_s"])
    rows = {r[0]: r[1:] for r in result["rows"]}
    assert rows["tokens generated"] == ["24", "24", "1.00x"] and rows["same text"][2] == "identical"
    assert "greedy texts identical" in result["summary"]


def test_cli_compare_json_reports_a_failed_setup_and_runs_the_other(capsys, tiny_checkpoint):
    from chatapp.cli import main

    rc = main(["compare", "--a", f"dmc,model={tiny_checkpoint}", "--b", "plain", "--prompt", "Hi", "--max-new-tokens",
               "6", "--device", "cpu", "--json"])
    out = capsys.readouterr()
    assert rc == 1
    result = json.loads(out.out)
    assert result["a"]["label"] == f"dmc,model={tiny_checkpoint}" and "no DMC" in result["a"]["error"]
    assert result["b"]["n_generated"] == 6 and result["b"]["decoding"] == "plain"
    assert result["speedup"] is None and result["identical"] is None
    assert result["summary"] == "no comparison: A failed"
    assert f"[dmc,model={tiny_checkpoint}] error:" in out.err


@asynccontextmanager
async def real_comparison(a: str, b: str, prompt: str, max_new_tokens: int, timeout: float):
    """The compare screen over a real engine worker, A and B run to the end: (app, pilot, screen)."""
    from engine.serving.worker import Worker

    client = EngineClient(Worker())
    screen = CompareScreen(client, parse_setup(a, device="cpu", max_new_tokens=max_new_tokens),
                           parse_setup(b, device="cpu", max_new_tokens=max_new_tokens), prompt)
    app = _App(screen)
    try:
        async with app.run_test(size=SIZE) as pilot:
            await pilot.press("enter")
            await wait_for(pilot, lambda: finished(screen), timeout, "the comparison")
            yield app, pilot, screen
    finally:
        client.close()


async def test_screen_on_the_embedded_model_shows_the_dmc_error_and_goes_on(tiny_checkpoint):
    """A: DMC on a model that has none (an error in its pane); B: Medusa on the embedded model."""
    async with real_comparison(f"dmc,model={tiny_checkpoint}", "medusa", "What is the capital of France?", 8,
                               120) as (app, pilot, screen):
        assert screen.outcome == {"a": "error", "b": "done"}
        [message] = screen.pane("a").errors
        assert "no DMC" in message and message in header(screen, "a")
        assert "SmolLM2-135M-Instruct on cpu" in header(screen, "b") and "done ·" in header(screen, "b")
        assert "Paris" in screen.pane("b").reply.source
        assert screen.summary_text == "no comparison: A failed"
        await pilot.press("q")
        await wait_for(pilot, lambda: app.dismissed, 2, "the screen to close")
        assert app.dismissed == [True]


async def test_screen_on_the_embedded_model_compares_dmc_with_medusa_over_dmc(tmp_path):
    """A: DMC; B: Medusa over the DMC cache (a fixed tree: the plan's choice depends on the
    machine's timings). Both panes finish, B in fewer steps, with the same text and compression."""
    tree = tmp_path / "tree.json"
    tree.write_text(json.dumps([[0], [0, 0], [1], [0, 0, 0], [2]]))
    async with real_comparison("dmc", f"medusa,dmc,medusa-choices={tree}", "Give me three tips for cooking rice.", 24,
                               180) as (app, pilot, screen):
        assert screen.outcome == {"a": "done", "b": "done"}
        assert header(screen, "b").startswith(f"B: medusa,dmc,medusa-choices={tree}")
        rows = table_rows(screen)
        assert rows["tokens generated"] == ["24", "24", "1.00x"] and rows["same text"][2] == "identical"
        steps_a, steps_b = int(rows["steps"][0]), int(rows["steps"][1])
        assert steps_a == 24 and steps_b < steps_a
        # the same compression (B's cache also holds its last token, which A has not run yet)
        compression = [float(c.rstrip("x")) for c in rows["KV compression"][:2]]
        assert compression[0] > 1.5 and compression[1] == pytest.approx(compression[0], abs=0.02)
        assert rows["decode tok/s"][2].endswith("x")
        assert screen.summary_text.endswith("greedy texts identical")
        assert screen.pane("a").reply.source == screen.pane("b").reply.source


def test_cli_compare_bad_spec(capsys):
    from chatapp.cli import main

    assert main(["compare", "--a", "medusa,fp9", "--b", "plain", "--prompt", "x", "--json"]) == 2
    err = capsys.readouterr().err
    assert "compare set-up 'medusa,fp9': unknown term 'fp9'" in err
