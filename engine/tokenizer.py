"""Tokenizer, chat template, EOS ids and streaming detokenization for one checkpoint."""

from __future__ import annotations

from pathlib import Path

from tokenizers.decoders import DecodeStream

from .config import ModelConfig
from .errors import EngineError


class ChatTokenizer:
    def __init__(self, model_dir: Path, cfg: ModelConfig):
        from transformers import AutoTokenizer

        model_dir = Path(model_dir)
        try:
            self.hf = AutoTokenizer.from_pretrained(str(model_dir))
        except Exception as e:
            raise EngineError(f"{model_dir}: cannot load the tokenizer ({type(e).__name__}: {e})") from None
        self.raw = self.hf.backend_tokenizer
        eos = list(cfg.eos_token_ids)
        if self.hf.eos_token_id is not None and self.hf.eos_token_id not in eos:
            eos.append(self.hf.eos_token_id)
        self.eos_ids = frozenset(eos)

    def encode_chat(self, messages: list[dict]) -> list[int]:
        """Token ids of a conversation, ending with the prompt for the assistant's reply."""
        if self.hf.chat_template:
            out = self.hf.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
            ids = out["input_ids"] if isinstance(out, dict) or hasattr(out, "keys") else out
            return list(ids)
        # A base model without a template: the plain text of the conversation.
        return self.encode("\n\n".join(m["content"] for m in messages))

    def encode(self, text: str) -> list[int]:
        return list(self.hf.encode(text))

    def decode(self, ids: list[int]) -> str:
        return self.hf.decode(ids, skip_special_tokens=True)

    def stream(self) -> "StreamDetokenizer":
        return StreamDetokenizer(self.raw)


class StreamDetokenizer:
    """Feed token ids one by one; get text pieces that are always whole characters."""

    def __init__(self, raw_tokenizer):
        self._tok = raw_tokenizer
        self._stream = DecodeStream(skip_special_tokens=True)

    def step(self, token_id: int) -> str:
        return self._stream.step(self._tok, token_id) or ""
