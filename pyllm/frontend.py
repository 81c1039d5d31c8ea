"""Frontend: what serving a model's requests needs without its weights: its config, tokenizer,
JSON-schema grammars and prompt checks. LLM is a Frontend with weights; a Ray ingress is one alone."""

import numpy as np

from .config import ModelConfig
from .errors import PyllmError
from .gguf_model import GGUFModel, is_gguf
from .grammar import Grammars
from .tokenizer import Tokenizer


def open_model(model: str):
    """A Hugging Face directory or a GGUF file -> (config, tokenizer, its GGUFModel or None)."""
    if is_gguf(model):
        gguf = GGUFModel(model)
        return gguf.config, gguf.tokenizer, gguf
    return ModelConfig.from_dir(model), Tokenizer(model), None


class Frontend:
    def __init__(self, config: ModelConfig, tokenizer: Tokenizer):
        self.config, self.tokenizer = config, tokenizer
        self.eos_ids = config.eos_token_ids
        self.grammars = Grammars(tokenizer, config.vocab_size, self.eos_ids)

    @classmethod
    def load(cls, model: str) -> "Frontend":
        config, tokenizer, _ = open_model(model)
        return cls(config, tokenizer)

    def encode_prompt(self, prompt) -> list[int]:
        """A prompt is text, or a list of token ids used as they are."""
        if isinstance(prompt, str):
            ids = self.tokenizer.encode(prompt)
        elif isinstance(prompt, (list, tuple)) and all(isinstance(t, (int, np.integer)) for t in prompt):
            ids = [int(t) for t in prompt]
        else:
            raise PyllmError("a prompt must be a string or a list of token ids")
        if not ids:
            raise PyllmError("the prompt is empty")
        if max(ids) >= self.config.vocab_size or min(ids) < 0:
            raise PyllmError(f"token id out of range: the vocabulary has {self.config.vocab_size} tokens")
        return ids

    def _check_fits(self, n_prompt: int):
        """A prompt must leave room for at least one generated token."""
        limit = self.config.max_position_embeddings
        if n_prompt >= limit:
            raise PyllmError(f"prompt too long: {n_prompt} tokens, the context window is {limit}")
