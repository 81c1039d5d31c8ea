"""LLM: the public engine. generate / stream / score / chat_session over one step loop.

One step runs one batched forward: it prefills (in chunks) the sequences whose prompts are not
yet cached and decodes one token for every other running sequence.
"""

import time
from dataclasses import dataclass, field

import numpy as np

from .backends import make_backend
from .errors import PyllmError
from .formats import QUANTIZE_CHOICES
from .frontend import Frontend, open_model
from .gguf_model import is_gguf
from .kv_blocks import PoolFull
from .model import LlamaModel
from .sampling import SamplingParams
from .sequence import Sequence
from .weights import load_weights

PREFILL_CHUNK = 512  # prompt tokens per sequence per step: bounds the attention scores' memory


@dataclass
class Output:
    text: str
    token_ids: list[int]          # generated tokens only
    finish_reason: str
    prompt_ids: list[int]
    stats: dict = field(default_factory=dict)

    @classmethod
    def of(cls, seq: Sequence, timer: "StepTimer") -> "Output":
        return cls(seq.text, list(seq.output_ids), seq.finish_reason, seq.prompt_ids, timer.stats(seq))


class LLM(Frontend):
    def __init__(self, model: str | None = None, backend: str = "cpu", dtype: str | None = None,
                 show_progress: bool = True, quantize: str | None = None):
        """model: a Hugging Face directory or a GGUF file (default: SmolLM2, pulled on first use).
        A GGUF file runs in its own formats; quantize (q8_0 | q4_0 | q4_1 | bf16) quantizes a
        safetensors model's matrices while they load."""
        if model is None:
            from .pull import ensure_default_model
            model = ensure_default_model()
        started = time.perf_counter()
        if is_gguf(model) and quantize:
            raise PyllmError("--quantize is for safetensors models: a GGUF file runs in its own formats")
        if quantize and quantize not in QUANTIZE_CHOICES:
            raise PyllmError(f"unknown --quantize {quantize!r}; choose from: {', '.join(QUANTIZE_CHOICES)}")
        config, tokenizer, gguf = open_model(model)
        super().__init__(config, tokenizer)
        self.backend = make_backend(backend, self.config, dtype)
        if gguf is not None:
            weights = gguf.load_weights(self.backend.upload, show_progress)
        else:
            weights = load_weights(self.config, model, self.backend.dtype, self.backend.upload, show_progress,
                                   quantize)
        self.model = LlamaModel(self.config, self.backend, weights)
        self.load_seconds = time.perf_counter() - started

    # ---- building sequences -------------------------------------------------------------
    def new_sequence(self, prompt_ids, params: SamplingParams, constraint=None, salt: str = "",
                     capacity: int | None = None) -> Sequence:
        """A sequence whose cache starts with the blocks of its prompt that the pool already holds
        (shared with whoever computed them; `salt` keeps apart those who must not share)."""
        self._check_fits(len(prompt_ids))
        cache = self.model.new_cache(capacity or len(prompt_ids) + params.max_tokens, salt)
        # a prompt scored token by token (prompt logprobs) computes every position: nothing cached
        cached = cache.match_prefix(prompt_ids) if params.prompt_logprobs is None else 0
        return Sequence(prompt_ids, params, cache, self.tokenizer, self.eos_ids, cached, constraint)

    # ---- the step loop ------------------------------------------------------------------
    def step(self, sequences, prefill_chunk=PREFILL_CHUNK):
        """One batched forward over the unfinished sequences -> [(sequence, new text)].
        A sequence still prefilling feeds at most `prefill_chunk` prompt tokens (a server keeps
        this small so running streams are not stalled by a long prompt). Sequences come in
        admission order: when the KV pool runs out, the latest give their blocks back (reserve)."""
        running, ended = self.reserve([s for s in sequences if not s.finished], prefill_chunk)
        batch = [(s.cache, s.pending_ids[:prefill_chunk]) for s in running]
        sample_now = [len(s.pending_ids) <= prefill_chunk for s in running]
        starts = [s.cache.length for s in running]
        scoring = any(s.wants_prompt_logits for s in running)
        logits = self.model.forward(batch, all_logits=scoring) if batch else []
        if scoring:  # every position's logits: each sequence's rows, its last row the one it samples from
            ends = np.cumsum([len(ids) for _, ids in batch])
            for seq, start, rows in zip(running, starts, np.split(logits, ends[:-1])):
                if seq.wants_prompt_logits:
                    seq.record_prompt_logits(rows, start)
            logits = logits[ends - 1]
        events = [(s, s.cut_short()) for s in ended]
        for seq, row, now in zip(running, logits, sample_now):
            if now:
                siblings = seq.spawn_choices() if seq.extra_choices else []
                events += [(s, s.add_token_from(row)) for s in [seq, *siblings]]
        for seq, _ in events:
            if seq.finished:  # its full blocks stay cached by content for later prompts
                seq.cache.release()
        return events

    @staticmethod
    def reserve(sequences, prefill_chunk):
        """-> (the sequences that got KV blocks for this step's tokens, in order; those that ended
        for lack of them). Each first takes what the pool caches of its tokens; a prompt whose next
        block an earlier prompt of this step computes waits a step and then takes that block, so a
        shared prefix is prefilled once. When the pool runs out, the latest sequence holding
        blocks gives them back (preempt) and waits for a later step; one that cannot grow even
        alone ends ('length')."""
        ready, ended, computing = [], [], set()
        for i, seq in enumerate(sequences):
            seq.take_cached_blocks()
            key = seq.cache.next_key(seq.prompt_ids) if seq.prefilling else None
            if key is not None and key in computing:
                continue
            computing.add(key)
            while True:
                try:
                    seq.cache.reserve(len(seq.pending_ids[:prefill_chunk]))
                    ready.append(seq)
                    break
                except PoolFull:
                    later = [s for s in sequences[i + 1:] if s.cache.blocks]
                    if later:
                        later[-1].preempt()
                    elif any(s.cache.blocks for s in sequences[:i]):  # earlier ones hold the pool: wait for them
                        seq.preempt()
                        break
                    else:
                        ended.append(seq)
                        break
        return ready, ended

    def run(self, sequences):
        """Step until every sequence finishes, yielding (sequence, new text) as tokens arrive."""
        while any(not s.finished for s in sequences):
            yield from self.step(sequences)

    # ---- public API ---------------------------------------------------------------------
    def generate(self, prompts, sampling: SamplingParams | None = None, **kwargs):
        """One prompt -> Output; a list of prompts -> list[Output], run as one batch."""
        single = isinstance(prompts, str) or (isinstance(prompts, (list, tuple)) and prompts
                                              and all(isinstance(t, (int, np.integer)) for t in prompts))
        params = sampling_params(sampling, kwargs)
        prompt_list = [prompts] if single else list(prompts)
        if not prompt_list:
            raise PyllmError("no prompts given")
        sequences = [self.new_sequence(self.encode_prompt(p), params) for p in prompt_list]
        timer = StepTimer(sequences)
        for _ in timer.wrap(self.run(sequences)):
            pass
        outputs = [Output.of(seq, timer) for seq in sequences]
        return outputs[0] if single else outputs

    def stream(self, prompt, sampling: SamplingParams | None = None, **kwargs):
        """Yield text pieces of one prompt's continuation as they are generated."""
        sequence = self.new_sequence(self.encode_prompt(prompt), sampling_params(sampling, kwargs))
        try:
            for _, piece in self.run([sequence]):
                if piece:
                    yield piece
        finally:  # the caller stopped reading early
            if not sequence.finished:
                sequence.abort()

    def score(self, token_ids) -> np.ndarray:
        """Logits at every position: token_ids [n] -> float32 [n, vocab]."""
        ids = self.encode_prompt(list(token_ids))
        limit = self.config.max_position_embeddings
        if len(ids) > limit:
            raise PyllmError(f"too many tokens to score: {len(ids)}, the context window is {limit}")
        cache = self.model.new_cache(len(ids))
        rows = [self.model.forward([(cache, ids[i:i + PREFILL_CHUNK])], all_logits=True)
                for i in range(0, len(ids), PREFILL_CHUNK)]
        cache.release()
        return np.concatenate(rows)

    def chat_session(self, system: str | None = None, **kwargs):
        from .chat import CHAT_MAX_TOKENS, ChatSession
        return ChatSession(self, system, SamplingParams(**{"max_tokens": CHAT_MAX_TOKENS, **kwargs}))


def sampling_params(sampling: SamplingParams | None, kwargs: dict) -> SamplingParams:
    """Either a SamplingParams or keywords, not both (keywords would be silently ignored)."""
    if sampling is not None and kwargs:
        raise PyllmError(f"give either a SamplingParams or sampling keywords, not both: {', '.join(kwargs)}")
    return sampling or SamplingParams(**kwargs)


class StepTimer:
    """Splits wall time into prefill (until a sequence's first token) and decode."""

    def __init__(self, sequences):
        self.sequences = sequences
        self.start = self.end = time.perf_counter()

    def wrap(self, events):
        self.start = time.perf_counter()
        for event in events:
            yield event
        self.end = time.perf_counter()

    def stats(self, seq: Sequence) -> dict:
        first = seq.first_token_at or self.end
        prefill_s, decode_s = first - self.start, self.end - first
        n_prefilled = len(seq.prompt_ids) - seq.cached_tokens
        n_decoded = max(len(seq.output_ids) - 1, 0)  # the first token comes from the prefill
        return {
            "prompt_tokens": len(seq.prompt_ids), "cached_tokens": seq.cached_tokens,
            "generated_tokens": len(seq.output_ids),
            "prefill_s": prefill_s, "decode_s": decode_s,
            "prefill_tok_s": n_prefilled / prefill_s if prefill_s > 0 else 0.0,
            "decode_tok_s": n_decoded / decode_s if decode_s > 0 else 0.0,
        }
