"""The ``chatapp`` command: the chat screen by default, and headless subcommands."""

from __future__ import annotations

import argparse
import json
import sys

from engine.errors import EngineError
from engine.events import DECODINGS, QUANTIZE, decoding_name

from chatapp.options import load_request
from chatapp.server import DEFAULT_API_KEY_ENV
from chatapp.store.settings import DEVICES

DEFAULT_REMOTE_KEY_ENV = "CHATAPP_REMOTE_API_KEY"  # --remote: where the server's key is read from
DESCRIPTION = "Terminal chat with a local inference engine (Llama-family models, CPU or NVIDIA GPU)."


def _decoding(text: str) -> str:
    """--decoding's value, normalised ("dmc,medusa" -> "medusa+dmc"); argparse reports a bad one."""
    try:
        return decoding_name(text)
    except EngineError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _shared(top: bool) -> dict[str, argparse.ArgumentParser]:
    """Parent parsers for the options that both the top level and subcommands take, each declared
    here once: "model" (--model, --device), "quantize" and "remote" (--remote, --remote-key-env).
    The top level's hold the defaults; a subcommand's default to SUPPRESS, so that an option given
    before the subcommand stays (``chatapp --model X run`` is ``chatapp run --model X``)."""
    def default(value) -> dict:
        return {"default": value if top else argparse.SUPPRESS}

    parents = {name: argparse.ArgumentParser(add_help=False) for name in ("model", "quantize", "remote")}
    parents["model"].add_argument("--model", **default(None),
                                  help="model id or checkpoint folder (default: the embedded SmolLM2-135M-Instruct)")
    parents["model"].add_argument("--device", choices=DEVICES, **default(None), help="default: cuda when available")
    parents["quantize"].add_argument("--quantize", choices=QUANTIZE, **default(None),
                                     help="quantize a bf16/fp16/fp32 checkpoint's linear layers on load")
    parents["remote"].add_argument("--remote", metavar="URL", **default(None),
                                   help="use a remote OpenAI-compatible server (e.g. http://host:8000/v1) instead of "
                                        "the local engine; --model then names the server's model (default: the "
                                        "first it lists)")
    parents["remote"].add_argument("--remote-key-env", metavar="VAR", **default(DEFAULT_REMOTE_KEY_ENV),
                                   help=f"environment variable with the remote server's API key (default "
                                        f"{DEFAULT_REMOTE_KEY_ENV})")
    return parents


def _loading() -> dict[str, argparse.ArgumentParser]:
    """Parent parsers for the subcommands' options of how the local engine loads a model, each
    declared here once: "context" (--context) and "decoding" (--decoding, --medusa-choices,
    --tokenizer)."""
    parents = {name: argparse.ArgumentParser(add_help=False) for name in ("context", "decoding")}
    parents["context"].add_argument("--context", type=int,
                                    help="KV cache length in tokens (default: min(the model's, 8192))")
    decoding = parents["decoding"]
    decoding.add_argument("--decoding", type=_decoding, default="plain", metavar="|".join(DECODINGS),
                          help="medusa: speculative decoding with the checkpoint's Medusa heads (or the ones "
                               "chatapp ships for it); dmc: Dynamic Memory Compression of the KV cache (a Megatron "
                               "DMC checkpoint, or a model chatapp ships a DMC retrofit for); medusa+dmc (or "
                               "medusa,dmc): Medusa's proposals verified over the DMC cache")
    decoding.add_argument("--medusa-choices", metavar="PRESET|FILE",
                          help="Medusa tree: auto (default: the best for this device, from the heads' measured "
                               "acceptance and this device's measured step time), card (the 8B model card's "
                               "63-node tree), or a JSON file with a list of paths such as [[0], [0, 0], [1]]")
    decoding.add_argument("--tokenizer", metavar="PATH",
                          help="tokenizer for a checkpoint without one (a Megatron DMC checkpoint): the Llama 2 "
                               "SentencePiece tokenizer.model, or a folder with tokenizer.json (default: in the "
                               "checkpoint's root folder)")
    return parents


def _parser() -> argparse.ArgumentParser:
    top = _shared(top=True)
    p = argparse.ArgumentParser(prog="chatapp", description=DESCRIPTION,
                                parents=[top["model"], top["quantize"], top["remote"]])
    sub = p.add_subparsers(dest="command")
    shared, loading = _shared(top=False), _loading()
    model, quantize, remote = shared["model"], shared["quantize"], shared["remote"]
    context, decoding = loading["context"], loading["decoding"]

    run = sub.add_parser("run", help="answer one prompt without the UI",
                         parents=[model, remote, quantize, context, decoding])
    run.add_argument("--prompt", required=True)
    run.add_argument("--system", help="system prompt")
    run.add_argument("--max-new-tokens", type=int, default=512)
    run.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    run.add_argument("--top-k", type=int, default=0)
    run.add_argument("--top-p", type=float, default=1.0)
    run.add_argument("--seed", type=int)
    run.add_argument("--ignore-eos", action="store_true", help="generate max-new-tokens tokens")
    run.add_argument("--json", action="store_true", help="print one JSON object with the reply and its figures")

    models = sub.add_parser("models", help="list the known and the locally available models, with the memory each "
                                          "needs on this machine's GPU (or RAM) and whether it fits",
                            parents=[context])
    models.add_argument("--online", action="store_true",
                        help="ask the Hugging Face hub for exact download sizes (default: the catalog's)")
    models.add_argument("--json", action="store_true", help="print a JSON object instead of the table")

    pull = sub.add_parser("pull", help="download a model from the Hugging Face hub (resumes an interrupted one)")
    pull.add_argument("id", help="model id, e.g. nvidia/Llama-3.1-8B-Medusa-FP8 (see `chatapp models`)")
    pull.add_argument("--revision", help="branch, tag or commit (default: main)")

    serve = sub.add_parser("serve", help="serve the model over an OpenAI-compatible HTTP API",
                           parents=[model, quantize, context, decoding])
    serve.add_argument("--host", default="127.0.0.1",
                       help="address to listen on (default 127.0.0.1: this machine only)")
    serve.add_argument("--port", type=int, default=8000, help="default 8000")
    serve.add_argument("--served-model-name", help="the model's name in the API (default: the model's own name)")
    serve.add_argument("--api-key-env", metavar="VAR",
                       help=f"environment variable that holds the API key clients must send (default: "
                            f"{DEFAULT_API_KEY_ENV}; no key needed when it is unset)")
    serve.add_argument("--max-queue", type=int, default=16,
                       help="requests that may wait behind the running one; more get 429 (default 16)")
    serve.add_argument("--max-tokens-limit", type=int, default=4096,
                       help="the largest max_tokens a request may ask for, and the default (default 4096)")
    serve.add_argument("--max-request-bytes", type=int, default=1 << 20,
                       help="the largest request body accepted; larger gets 413 (default 1048576)")

    ppl = sub.add_parser("perplexity", help="perplexity of a model on a text file (to compare weight formats)",
                         parents=[model, quantize])
    ppl.add_argument("--file", required=True, help="a UTF-8 text file")
    ppl.add_argument("--window", type=int, default=512, help="tokens per window (default 512)")
    ppl.add_argument("--stride", type=int, default=256, help="tokens between window starts (default 256)")
    ppl.add_argument("--json", action="store_true")

    cmp = sub.add_parser("compare", help="one prompt, two decoding set-ups side by side (speed, memory, text)",
                         parents=[model, context])
    cmp.add_argument("--a", metavar="SPEC", default="plain",
                     help=f"set-up A (default plain): comma-separated terms: a decoding ({', '.join(DECODINGS)}), a "
                          "weight format (fp8: quantize on load, bf16: as stored), model=ID_OR_PATH, "
                          "medusa-choices=auto|card|FILE, temperature=, top_p=, top_k=, seed=, max_new_tokens= "
                          "(e.g. medusa,fp8 or plain,temperature=0.8,seed=1); greedy unless told; the model: "
                          "--model's, unless the spec names one")
    cmp.add_argument("--b", metavar="SPEC", default="medusa", help="set-up B (default medusa), as for --a")
    cmp.add_argument("--prompt", help="the prompt both set-ups answer (required with --json)")
    cmp.add_argument("--max-new-tokens", type=int, default=256, help="per set-up, unless its spec says (default 256)")
    cmp.add_argument("--json", action="store_true",
                     help="run headless and print one JSON object: both set-ups' figures, speed-up, same text")
    return p


def _remote_check(args) -> str | None:
    """The remote server's API key; refuses the options that only apply to the local engine."""
    import os

    from engine.errors import EngineError

    local = [f"--{name.replace('_', '-')}" for name in ("device", "quantize", "context", "medusa_choices", "tokenizer")
             if getattr(args, name, None) is not None]
    if getattr(args, "decoding", "plain") != "plain":
        local.append("--decoding")
    if local:
        raise EngineError(f"{', '.join(local)} apply to the local engine, not to --remote")
    return os.environ.get(args.remote_key_env) or None


def _remote_session(args, progress):
    from engine.serving.remote import RemoteSession

    return RemoteSession.connect(args.remote, _remote_check(args), args.model, progress)


def _run(args) -> int:
    from engine.errors import EngineError
    from engine.events import Done, SamplingParams, Token

    def progress(msg: str) -> None:
        print(msg, file=sys.stderr)

    messages = ([{"role": "system", "content": args.system}] if args.system else []) + [
        {"role": "user", "content": args.prompt}]
    params = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                            top_p=args.top_p, seed=args.seed, ignore_eos=args.ignore_eos)
    try:
        if args.remote:
            session = _remote_session(args, progress)
        else:
            from engine.session import Session  # torch: not imported for a remote server

            session = Session.load(load_request(args), progress)
        for ev in session.generate(messages, params):
            if isinstance(ev, Token) and not args.json:
                sys.stdout.write(ev.text)
                sys.stdout.flush()
            elif isinstance(ev, Done):
                if args.json:
                    print(json.dumps(ev.stats.to_dict(), ensure_ascii=False))
                else:
                    sys.stdout.write("\n")
                    s = ev.stats
                    progress(f"[{s.n_generated} tokens, {s.decode_tokens_per_s:.1f} tok/s, "
                             f"first token {s.time_to_first_token_s:.2f} s, {s.device}]")
    except EngineError as e:
        print(f"chatapp: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


def _perplexity(args) -> int:
    from pathlib import Path

    from engine.errors import EngineError
    from engine.session import Session

    try:
        path = Path(args.file)
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise EngineError(f"{path}: cannot read it as UTF-8 text ({e})") from None
        session = Session.load(load_request(args), lambda msg: print(msg, file=sys.stderr))
        result = session.perplexity(text, args.window, args.stride)
    except EngineError as e:
        print(f"chatapp: error: {e}", file=sys.stderr)
        return 1
    result = {**result, "model": session.name, "quantization": args.quantize, "device": session.device.type,
              "file": str(path), "window": args.window, "stride": args.stride}
    if args.json:
        print(json.dumps(result))
    else:
        print(f"perplexity {result['perplexity']:.4f} over {result['tokens']} tokens")
    return 0


def _compare(args) -> int:
    from engine.errors import EngineError
    from chatapp.compare.spec import parse_setup

    if args.remote:
        print("chatapp: error: --remote does not apply to `chatapp compare`", file=sys.stderr)
        return 2
    try:
        a, b = (parse_setup(spec, model=args.model, device=args.device, context=args.context,
                            max_new_tokens=args.max_new_tokens) for spec in (args.a, args.b))
    except EngineError as e:
        print(f"chatapp: error: {e}", file=sys.stderr)
        return 2
    if args.json:
        from chatapp.compare.figures import run_compare

        if not (args.prompt or "").strip():
            print("chatapp: error: `chatapp compare --json` needs --prompt", file=sys.stderr)
            return 2
        try:
            result = run_compare(a, b, args.prompt, lambda msg: print(msg, file=sys.stderr))
        except KeyboardInterrupt:
            return 130
        print(json.dumps(result, ensure_ascii=False))
        return 1 if any("error" in result[k] for k in ("a", "b")) else 0
    from chatapp.tui.app import ChatApp

    ChatApp(args, compare=(a, b, args.prompt)).run()
    return 0


def _models(args) -> int:
    from engine.hub.catalog import device_memory, model_rows
    from engine.units import decimal_size, gib

    device = device_memory()
    rows = model_rows(args.context, device, online=args.online)
    if args.json:
        print(json.dumps({"device": {"name": device.name, "free_bytes": device.free_bytes,
                                     "total_bytes": device.total_bytes},
                          "models": [r.to_dict() for r in rows]}, ensure_ascii=False))
        return 0
    ctx = f"{args.context} tokens of context" if args.context else "the default context (min(model's, 8192) tokens)"
    print(f"device: {device.name}, {gib(device.free_bytes)} free of {gib(device.total_bytes)}; estimates for {ctx}")
    print(f"{'MODEL':56s} {'FORMAT':28s} {'PARAMS':>7s} {'DOWNLOAD':>9s} {'MEMORY':>10s}  {'FIT':9s}  WHERE")
    for r in rows:
        m, est = r.entry, r.estimate
        params = f"{m.params_b:.3g}B" if m.params_b else "?"
        where = m.local_path or "not downloaded"
        if m.partial:
            where += " (incomplete: `chatapp pull` resumes it)"
        size = "bundled" if r.download_source == "embedded" else decimal_size(r.download_bytes)
        print(f"{m.id:56s} {m.format:28s} {params:>7s} {size:>9s} {gib(est.total_bytes):>10s}  "
              f"{est.verdict:9s}  {where}")
        print(f"    {est.reason}")
    return 0


def _progress_line(p) -> str:
    from engine.units import decimal_size, duration

    width = 24
    filled = int(p.fraction * width)
    return (f"[{'#' * filled}{'.' * (width - filled)}] {p.fraction:4.0%} {decimal_size(p.done_bytes)}/{decimal_size(p.total_bytes)} "
            f"{decimal_size(int(p.bytes_per_s))}/s ETA {duration(p.eta_s)} {p.files_done}/{p.files_total} files")


def _pull(args) -> int:
    from engine.hub.download import DownloadCancelled, pull
    from engine.errors import EngineError

    last = [0]

    def draw(p) -> None:
        line = _progress_line(p)
        sys.stderr.write("\r" + line + " " * max(0, last[0] - len(line)))
        sys.stderr.flush()
        last[0] = len(line)

    try:
        path = pull(args.id, draw, revision=args.revision)
    except DownloadCancelled as e:
        print(f"\nchatapp: {e}", file=sys.stderr)
        return 130
    except EngineError as e:
        print(("\n" if last[0] else "") + f"chatapp: error: {e}", file=sys.stderr)
        return 1
    if last[0]:
        sys.stderr.write("\n")
    print(path)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.remote and args.command in ("models", "perplexity", "serve", "pull"):
        print(f"chatapp: error: --remote does not apply to `chatapp {args.command}`", file=sys.stderr)
        return 2
    if args.command == "run":
        return _run(args)
    if args.command == "models":
        return _models(args)
    if args.command == "pull":
        return _pull(args)
    if args.command == "perplexity":
        return _perplexity(args)
    if args.command == "compare":
        return _compare(args)
    if args.command == "serve":
        from chatapp.server.app import main as serve

        return serve(args)
    from chatapp.tui.app import ChatApp

    if args.remote:
        from engine.serving.client import EngineClient
        from engine.errors import EngineError
        from engine.serving.remote import RemoteWorker

        try:
            client = EngineClient(RemoteWorker(args.remote, _remote_check(args)))
        except EngineError as e:
            print(f"chatapp: error: {e}", file=sys.stderr)
            return 1
        ChatApp(args, client=client).run()
        return 0
    ChatApp(args).run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
