"""SamplingParams and sample(): greedy, temperature, top-k, top-p, min-p, repetition penalty, seed.

Logit processors run in the order transformers applies them: repetition penalty, temperature,
top-k, top-p, min-p. Each sequence owns a seeded generator, so the same seed gives the same tokens.
"""

from dataclasses import dataclass, field

import numpy as np

from .errors import PyllmError


@dataclass
class SamplingParams:
    max_tokens: int = 256
    temperature: float = 0.0        # 0 means greedy
    top_k: int = 0                  # 0 means off
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    ignore_eos: bool = False

    def __post_init__(self):
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        checks = [
            (isinstance(self.max_tokens, int) and self.max_tokens >= 1, "max_tokens must be an integer >= 1"),
            (self.temperature >= 0, "temperature must be >= 0"),
            (isinstance(self.top_k, int) and self.top_k >= 0, "top_k must be an integer >= 0"),
            (0 < self.top_p <= 1, "top_p must be in (0, 1]"),
            (0 <= self.min_p <= 1, "min_p must be in [0, 1]"),
            (self.repetition_penalty > 0, "repetition_penalty must be > 0"),
            (all(isinstance(s, str) and s for s in self.stop), "stop must be non-empty strings"),
        ]
        for ok, message in checks:
            if not ok:
                raise PyllmError(message)

    def new_generator(self) -> np.random.Generator:
        return np.random.default_rng(self.seed)


def apply_repetition_penalty(logits, seen_ids, penalty):
    """Scale down logits of tokens already seen (prompt and output), as transformers does."""
    if penalty == 1.0 or len(seen_ids) == 0:
        return logits
    ids = np.unique(np.asarray(seen_ids))
    picked = logits[ids]
    logits[ids] = np.where(picked < 0, picked * penalty, picked / penalty)
    return logits


def sample(logits, params: SamplingParams, rng: np.random.Generator, seen_ids=()) -> int:
    """logits [vocab] f32 (host) -> next token id."""
    logits = apply_repetition_penalty(np.array(logits, dtype=np.float32), seen_ids, params.repetition_penalty)
    if params.temperature == 0:
        return int(np.argmax(logits))
    logits /= np.float32(params.temperature)
    if 0 < params.top_k < logits.size:
        kth = np.partition(logits, -params.top_k)[-params.top_k]
        logits[logits < kth] = -np.inf
    probs = np.exp(logits - logits.max())
    probs /= probs.sum()
    if params.top_p < 1.0:
        order = np.argsort(-probs, kind="stable")
        cumulative = np.cumsum(probs[order])
        # keep the smallest prefix whose mass reaches top_p (the token crossing it stays)
        cut = np.searchsorted(cumulative, params.top_p) + 1
        probs[order[cut:]] = 0.0
    if params.min_p > 0:
        probs[probs < params.min_p * probs.max()] = 0.0
    probs /= probs.sum()
    return int(rng.choice(probs.size, p=probs))
