"""Tokenizer, chat template, EOS ids and streaming detokenization for one checkpoint.

Reads the Hugging Face files directly with `tokenizers` and renders the chat template with
Jinja in a sandbox, as transformers does, without importing transformers (seconds at start)."""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import Tokenizer
from tokenizers.decoders import DecodeStream

from engine.chat_template import MAX_TEMPLATE_BYTES, render, template_env
from engine.config import ModelConfig
from engine.errors import EngineError


def _unicode(text: str) -> str:
    """``text`` when it is valid Unicode; an EngineError where it holds a lone surrogate (bytes
    that were not UTF-8, read with surrogateescape, or an escaped "\\ud800" in JSON)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise EngineError(f"the text is not valid Unicode: {e.object[e.start:e.end]!a} at character {e.start} "
                          "(bytes that are not UTF-8?)") from None
    return text


def _token_text(value) -> str | None:
    if isinstance(value, dict):  # serialized AddedToken
        return value.get("content")
    return value


def sentencepiece_dir(model_file: Path) -> Path:
    """A folder with tokenizer.json and tokenizer_config.json for a SentencePiece ``tokenizer.model``
    (the Llama 2 tokenizer, which Megatron checkpoints do not include): converted once with
    transformers' Llama converter (legacy whitespace handling, as the Hugging Face Llama 2 files
    have it; it can differ from SentencePiece on text that starts with a run of spaces) and cached
    under ``<cache>/tokenizers/<content hash>/``."""
    import hashlib

    from engine.paths import cache_dir

    model_file = Path(model_file)
    try:
        data = model_file.read_bytes()
    except OSError as e:
        raise EngineError(f"{model_file}: cannot read the tokenizer file ({e.strerror})") from None
    out = cache_dir() / "tokenizers" / hashlib.sha256(data).hexdigest()[:24]
    if (out / "tokenizer.json").is_file() and (out / "tokenizer_config.json").is_file():
        return out
    import shutil
    import tempfile

    from transformers import LlamaTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        shutil.copyfile(model_file, Path(tmp) / "tokenizer.model")
        try:
            tok = LlamaTokenizer.from_pretrained(tmp, legacy=True)
            if tok.vocab_size < 3:
                raise ValueError("no vocabulary")
        except Exception as e:  # transformers raises many kinds for a file that is not SentencePiece
            raise EngineError(f"{model_file}: not a SentencePiece tokenizer model ({type(e).__name__}: "
                              f"{str(e).splitlines()[0] if str(e) else 'unreadable'})") from None
        staging = out.with_name(out.name + ".tmp")
        shutil.rmtree(staging, ignore_errors=True)
        tok.save_pretrained(str(staging))
        shutil.rmtree(out, ignore_errors=True)
        staging.replace(out)
    return out


class ChatTokenizer:
    def __init__(self, model_dir: Path, cfg: ModelConfig):
        model_dir = Path(model_dir)
        path = model_dir / "tokenizer.json"
        if not path.exists():
            raise EngineError(f"{path}: file not found (the checkpoint has no tokenizer)")
        try:
            self.raw = Tokenizer.from_file(str(path))
        except Exception as e:
            raise EngineError(f"{path}: cannot load the tokenizer ({e})") from None
        tok_cfg_path = model_dir / "tokenizer_config.json"
        try:
            tok_cfg = json.loads(tok_cfg_path.read_text(encoding="utf-8")) if tok_cfg_path.exists() else {}
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise EngineError(f"{tok_cfg_path}: not valid JSON ({e})") from None
        except OSError as e:
            raise EngineError(f"{tok_cfg_path}: cannot read it ({e.strerror or e})") from None
        if not isinstance(tok_cfg, dict):
            raise EngineError(f"{tok_cfg_path}: expected a JSON object")
        self.bos_token = _token_text(tok_cfg.get("bos_token")) or ""
        self.eos_token = _token_text(tok_cfg.get("eos_token")) or ""
        eos = list(cfg.eos_token_ids)
        eos_id = self.raw.token_to_id(self.eos_token) if self.eos_token else None
        if eos_id is not None and eos_id not in eos:
            eos.append(eos_id)
        self.eos_ids = frozenset(eos)
        jinja = model_dir / "chat_template.jinja"
        self.template_source = jinja if jinja.exists() else tok_cfg_path  # where the template was read from
        self.chat_template = self._read_template(model_dir, tok_cfg)
        self._template = None
        if self.chat_template is not None:
            self._compiled()  # a template that does not parse fails the load, not the first message

    @staticmethod
    def _read_template(model_dir: Path, tok_cfg: dict) -> str | None:
        jinja = model_dir / "chat_template.jinja"
        if jinja.exists():
            try:
                with open(jinja, "rb") as f:  # bounded: the file may be anything, even /dev/zero
                    data = f.read(MAX_TEMPLATE_BYTES + 1)
            except OSError as e:
                raise EngineError(f"{jinja}: cannot read it ({e.strerror or e})") from None
            if len(data) > MAX_TEMPLATE_BYTES:
                raise EngineError(f"{jinja}: larger than a chat template may be ({MAX_TEMPLATE_BYTES:,} bytes)")
            try:
                return data.decode("utf-8")
            except UnicodeDecodeError as e:
                raise EngineError(f"{jinja}: not UTF-8 text (byte {e.start})") from None
        template = tok_cfg.get("chat_template")
        if isinstance(template, list):  # named templates: use the default one
            named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
            template = named.get("default")
        if isinstance(template, str) and len(template.encode("utf-8")) > MAX_TEMPLATE_BYTES:
            raise EngineError(f"{model_dir / 'tokenizer_config.json'}: its chat_template is larger than a chat "
                              f"template may be ({MAX_TEMPLATE_BYTES:,} bytes)")
        return template if isinstance(template, str) else None

    def render_chat(self, messages: list[dict]) -> str:
        """The conversation as text, ending with the prompt for the assistant's reply."""
        if self.chat_template is None:  # a base model: the plain text of the conversation
            return self.bos_token + "\n\n".join(m["content"] for m in messages)
        try:
            return render(self._compiled(), messages=messages, add_generation_prompt=True,
                           bos_token=self.bos_token, eos_token=self.eos_token)
        except Exception as e:
            raise EngineError(f"{self.template_source}: chat template: {e}") from None

    def _compiled(self):
        if self._template is None:
            try:
                self._template = template_env().from_string(self.chat_template)
            except Exception as e:
                raise EngineError(f"{self.template_source}: the chat template does not parse "
                                  f"({' '.join(str(e).split())})") from None
        return self._template

    def encode_chat(self, messages: list[dict]) -> list[int]:
        return self.encode(self.render_chat(messages))

    def encode(self, text: str) -> list[int]:
        """Token ids of text, with no special tokens added (templates write their own)."""
        return self.raw.encode(_unicode(text), add_special_tokens=False).ids

    def encode_prompt(self, text: str) -> list[int]:
        """Token ids of a raw-text prompt (a completion, no chat template), with the special tokens
        the tokenizer itself adds to a sequence (a Llama BOS; none for SmolLM2)."""
        return self.raw.encode(_unicode(text), add_special_tokens=True).ids

    def decode(self, ids: list[int]) -> str:
        return self.raw.decode(ids, skip_special_tokens=True)

    def stream(self) -> "StreamDetokenizer":
        return StreamDetokenizer(self.raw)


class StreamDetokenizer:
    """Feed token ids one by one; get text pieces that are always whole characters."""

    def __init__(self, raw_tokenizer: Tokenizer):
        self._tok = raw_tokenizer
        self._stream = DecodeStream(skip_special_tokens=True)

    def step(self, token_id: int) -> str:
        return self._stream.step(self._tok, token_id) or ""
