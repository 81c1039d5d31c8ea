"""Sequence: one prompt being generated: its tokens, cache, sampler state, text and finish reason."""

import time
from collections import Counter

from .logprobs import TokenLogprob, token_logprob
from .sampling import SamplingParams, adjust_logits, sample
from .tokenizer import IncrementalDetokenizer


class Sequence:
    def __init__(self, prompt_ids, params: SamplingParams, cache, tokenizer, eos_ids, cached_tokens=0,
                 constraint=None, choice: int = 0):
        self.prompt_ids = list(prompt_ids)
        self.params = params
        self.cache = cache
        self.tokenizer, self.eos_ids = tokenizer, set(eos_ids)
        self.choice = choice    # which of a request's n choices this is; it picks the seed stream
        self.rng = params.new_generator(choice)
        self.detokenizer = IncrementalDetokenizer(tokenizer, self.prompt_ids)
        self.constraint = constraint  # a grammar.Constraint that masks every step's logits, or None
        self.output_ids: list[int] = []
        self.output_counts = Counter()  # generated token -> times, for the frequency and presence penalties
        self.logprobs: list[TokenLogprob] = []                # per generated token, when params.logprobs is set
        self.prompt_logprobs: list[TokenLogprob | None] = []  # per prompt token (the first: None), when asked
        self.extra_choices = 0  # choices still to spawn from this one once its prompt is prefilled
        self.spawned_from = None
        self.text = ""          # visible text emitted so far
        self._held = ""         # text that might be the start of a stop string
        self.finish_reason = None  # "stop" | "length" | "abort"
        self.cached_tokens = cached_tokens  # prompt tokens found in the cache, not prefilled
        self.first_token_at = None
        self.preempted = False  # its blocks were given back; take_cached_blocks() before it runs again

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def pending_ids(self) -> list[int]:
        """Tokens to feed before the next token is sampled: the prompt's rest while prefilling, the
        last sampled token while decoding, or everything again after preemption."""
        return (self.prompt_ids + self.output_ids)[self.cache.length:]

    @property
    def prefilling(self) -> bool:
        return self.cache.length < len(self.prompt_ids)

    def preempt(self):
        """Give every KV block back (the pool ran out); the tokens so far stay, and a later step
        recomputes them, starting from whatever prefix of them the pool still caches."""
        self.cache.release()
        self.cache.pool.preemptions += 1
        self.preempted = True

    def take_cached_blocks(self):
        """Before a step: a preempted sequence takes back what the pool still caches of its tokens;
        one still prefilling takes the prompt blocks others have computed since it started."""
        if self.preempted:
            if not self.wants_prompt_logits:  # prompt positions still to score are computed again
                self.cache.match_prefix(self.prompt_ids + self.output_ids)
            self.preempted = False
        elif self.prefilling and self.params.prompt_logprobs is None:
            before = self.cache.length
            self.cached_tokens += self.cache.match_prefix(self.prompt_ids) - before

    @property
    def last_token(self) -> int:
        return self.output_ids[-1]

    @property
    def wants_prompt_logits(self) -> bool:
        return self.params.prompt_logprobs is not None and len(self.prompt_logprobs) < len(self.prompt_ids)

    def record_prompt_logits(self, rows, first_position: int):
        """rows[j]: the logits after prompt token first_position + j, which score the token after it."""
        if not self.prompt_logprobs:
            self.prompt_logprobs.append(None)  # nothing comes before the first token to score it
        for position, row in enumerate(rows, first_position + 1):
            if position < len(self.prompt_ids):
                self.prompt_logprobs.append(token_logprob(row, self.prompt_ids[position], self.params.prompt_logprobs))

    def spawn_choices(self) -> list["Sequence"]:
        """The other choices of an n > 1 request, once this one's prompt is prefilled: each shares
        the prompt's K/V blocks, with its own seed stream and grammar state."""
        spawned = []
        for choice in range(self.choice + 1, self.choice + 1 + self.extra_choices):
            cache = self.cache.fork()
            constraint = self.constraint.copy() if self.constraint is not None else None
            sibling = Sequence(self.prompt_ids, self.params, cache, self.tokenizer, self.eos_ids, self.cached_tokens,
                               constraint, choice)
            sibling.prompt_logprobs, sibling.spawned_from = self.prompt_logprobs, self
            spawned.append(sibling)
        self.extra_choices = 0
        return spawned

    def add_token_from(self, logits) -> str:
        """Sample the next token from logits [vocab] -> the new visible text (maybe empty)."""
        if self.params.max_tokens == 0:  # only the prompt's log-probabilities were asked for
            self.finish_reason = "length"
            return ""
        raw = logits
        if self.params.adjusts_logits:
            logits = adjust_logits(logits, self.params, self.output_counts)
        if self.constraint is not None:
            logits = self.constraint.mask(logits)
        seen = self.prompt_ids + self.output_ids if self.params.repetition_penalty != 1.0 else ()
        token = sample(logits, self.params, self.rng, seen)
        if self.params.logprobs is not None:
            self.logprobs.append(token_logprob(raw, token, self.params.logprobs))
        if self.first_token_at is None:
            self.first_token_at = time.perf_counter()
        self.output_ids.append(token)
        self.output_counts[token] += 1
        if token in self.eos_ids and not self.params.ignore_eos:
            self.finish_reason = "stop"
            return self._release(self.detokenizer.flush(), final=True)
        if self.constraint is not None and self.constraint.advance(token):
            self.finish_reason = "stop"  # the grammar is complete: nothing may follow
        piece = self.detokenizer.add(token)
        if not self.finished and (len(self.output_ids) >= self.params.max_tokens
                                  or self.cache.length >= self.cache.capacity):
            self.finish_reason = "length"  # the budget is spent, or no slot is left to feed this token back
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

    def cut_short(self) -> str:
        """End with finish reason 'length' now (no KV room is left to grow) -> the text held back."""
        self.finish_reason = "length"
        return self._release(self.detokenizer.flush(), final=True)

    def abort(self):
        self.finish_reason = "abort"
