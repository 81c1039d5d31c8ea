"""Sequence: one prompt being generated: its tokens, cache, sampler state, text and finish reason."""

import time

from .sampling import SamplingParams, sample
from .tokenizer import IncrementalDetokenizer


class Sequence:
    def __init__(self, prompt_ids, params: SamplingParams, cache, tokenizer, eos_ids, cached_tokens=0):
        self.prompt_ids = list(prompt_ids)
        self.params = params
        self.cache = cache
        self.eos_ids = set(eos_ids)
        self.rng = params.new_generator()
        self.detokenizer = IncrementalDetokenizer(tokenizer, self.prompt_ids)
        self.output_ids: list[int] = []
        self.text = ""          # visible text emitted so far
        self._held = ""         # text that might be the start of a stop string
        self.finish_reason = None  # "stop" | "length" | "abort"
        self.cached_tokens = cached_tokens  # prompt tokens found in the cache, not prefilled
        self.first_token_at = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def pending_prompt(self) -> list[int]:
        """Prompt tokens not yet in the cache."""
        return self.prompt_ids[self.cache.length:] if self.cache.length < len(self.prompt_ids) else []

    @property
    def cached_ids(self) -> list[int]:
        """The tokens whose K/V the cache holds, in order (the last sampled token is not fed yet)."""
        return (self.prompt_ids + self.output_ids)[:self.cache.length]

    @property
    def last_token(self) -> int:
        return self.output_ids[-1]

    def add_token_from(self, logits) -> str:
        """Sample the next token from logits [vocab] -> the new visible text (maybe empty)."""
        seen = self.prompt_ids + self.output_ids if self.params.repetition_penalty != 1.0 else ()
        token = sample(logits, self.params, self.rng, seen)
        if self.first_token_at is None:
            self.first_token_at = time.perf_counter()
        self.output_ids.append(token)
        if token in self.eos_ids and not self.params.ignore_eos:
            self.finish_reason = "stop"
            return self._release(self.detokenizer.flush(), final=True)
        piece = self.detokenizer.add(token)
        if len(self.output_ids) >= self.params.max_tokens:
            self.finish_reason = "length"
        elif self.cache.length >= self.cache.capacity:
            self.finish_reason = "length"  # no slot left to feed this token back: context full
        if self.finished:
            piece += self.detokenizer.flush()
        return self._release(piece, final=self.finished)

    def _release(self, piece: str, final: bool) -> str:
        """Emit text, holding back any tail that could still grow into a stop string."""
        pending = self._held + piece
        hits = [at for at in (pending.find(stop) for stop in self.params.stop) if at >= 0]
        if hits:
            self.finish_reason = "stop"
            pending, final = pending[:min(hits)], True
        if final:
            self._held = ""
        else:
            keep = max((k for stop in self.params.stop for k in range(len(stop), 0, -1)
                        if pending.endswith(stop[:k])), default=0)
            pending, self._held = pending[:len(pending) - keep], pending[len(pending) - keep:]
        self.text += pending
        return pending

    def abort(self):
        self.finish_reason = "abort"
