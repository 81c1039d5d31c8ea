"""Tokenizer (HF `tokenizers`), chat-template rendering (jinja2) and incremental detokenization."""

import json
from datetime import datetime
from pathlib import Path

from jinja2.exceptions import TemplateError
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer as HFTokenizer

from .config import read_json_object
from .errors import PyllmError, first_line

CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] "
    "+ '<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def _token_text(value):
    """tokenizer_config.json writes special tokens either as strings or as {"content": ...}."""
    return value.get("content") if isinstance(value, dict) else value


def _raise_exception(message):
    raise TemplateError(message)


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # jinja's own tojson escapes HTML characters, which would change the prompt text
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


class Tokenizer:
    def __init__(self, model_dir: str | Path):
        """From a Hugging Face directory: tokenizer.json (+ tokenizer_config.json)."""
        model_dir = Path(model_dir)
        path = model_dir / "tokenizer.json"
        if not path.is_file():
            raise PyllmError(f"missing file: {path}")
        try:
            hf = HFTokenizer.from_file(str(path))
        except Exception as exc:  # the Rust side raises plain Exceptions with multi-line text
            raise PyllmError(f"cannot read {path}: {first_line(exc)}") from None
        config_path = model_dir / "tokenizer_config.json"
        self._setup(hf, read_json_object(config_path) if config_path.is_file() else {})

    @classmethod
    def from_parts(cls, hf: HFTokenizer, config: dict) -> "Tokenizer":
        """From a built tokenizers.Tokenizer and a tokenizer_config dict (a GGUF file's metadata)."""
        tokenizer = cls.__new__(cls)
        tokenizer._setup(hf, config)
        return tokenizer

    def _setup(self, hf: HFTokenizer, config: dict):
        self.hf = hf
        self.bos_token = _token_text(config.get("bos_token")) or ""
        self.eos_token = _token_text(config.get("eos_token")) or ""
        self.pad_token = _token_text(config.get("pad_token")) or ""
        template = config.get("chat_template") or CHATML_TEMPLATE
        if isinstance(template, list):  # a list of named templates: take the default one
            template = next((t["template"] for t in template if t.get("name") == "default"), template[0]["template"])
        # the environment transformers' apply_chat_template renders in, so templates render the same
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
        env.filters["tojson"] = _tojson
        env.globals.update(raise_exception=_raise_exception,
                           strftime_now=lambda fmt: datetime.now().strftime(fmt))
        self.chat_template_source = template
        self.chat_template = env.from_string(template)
        self.template_renders_tools = "tools" in template
        self.vocab_size = self.hf.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Plain text -> ids; the tokenizer's own post-processor adds BOS where the model wants it."""
        return self.hf.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return self.hf.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def render_chat(self, messages: list[dict], add_generation_prompt: bool = True, tools=None) -> str:
        for message in messages:
            if not isinstance(message, dict) or not isinstance(message.get("role"), str) \
                    or not isinstance(message.get("content"), str):
                raise PyllmError("each message needs a string 'role' and a string 'content'")
        try:
            return self.chat_template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                             bos_token=self.bos_token, eos_token=self.eos_token, tools=tools)
        except TemplateError as exc:
            raise PyllmError(f"chat template: {exc}") from None

    def encode_chat(self, messages: list[dict], add_generation_prompt: bool = True, tools=None) -> list[int]:
        """As transformers' apply_chat_template(tokenize=True): the template writes the special tokens."""
        return self.encode(self.render_chat(messages, add_generation_prompt, tools), add_special_tokens=False)


class IncrementalDetokenizer:
    """Turns a growing list of token ids into text pieces that concatenate to decode(all ids).

    Decodes a short window of recent tokens twice (with and without the newest ones) and emits
    the difference; a piece ending in U+FFFD is held back until the rest of its UTF-8 bytes arrive.
    """

    CONTEXT_TOKENS = 6

    def __init__(self, tokenizer: Tokenizer, prompt_ids=()):
        self.tokenizer = tokenizer
        self.ids = self._context(list(prompt_ids))
        self.prefix_offset = 0
        self.read_offset = len(self.ids)

    def _context(self, prompt_ids) -> list[int]:
        """The last few prompt tokens, starting on a whole character. SentencePiece decoders strip
        the space at the start of a text, so without this left context the first generated word
        would lose its space; starting mid-character would turn a byte-fallback run into U+FFFDs."""
        tail = prompt_ids[-self.CONTEXT_TOKENS:]
        for start in range(len(tail)):
            if not self.tokenizer.decode(tail[start:]).startswith("\ufffd"):
                return tail[start:]
        return []

    def add(self, token_id: int) -> str:
        self.ids.append(token_id)
        decode = self.tokenizer.decode
        prefix_text = decode(self.ids[self.prefix_offset:self.read_offset])
        new_text = decode(self.ids[self.prefix_offset:])
        if len(new_text) <= len(prefix_text) or new_text.endswith("\ufffd"):
            return ""
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        return new_text[len(prefix_text):]

    def flush(self) -> str:
        """Whatever is held back (an incomplete character at the very end) once no token follows."""
        prefix_text = self.tokenizer.decode(self.ids[self.prefix_offset:self.read_offset])
        self.read_offset = len(self.ids)
        return self.tokenizer.decode(self.ids[self.prefix_offset:])[len(prefix_text):]
