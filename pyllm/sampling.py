"""SamplingParams and sample(): greedy, temperature, top-k, top-p, min-p, repetition penalty, seed.

Logit processors run in the order transformers applies them: repetition penalty, temperature,
top-k, top-p, min-p. OpenAI's additive adjustments (frequency and presence penalties on the
generated tokens, logit_bias) come before them, in adjust_logits(). Each sequence owns a seeded
generator, so the same seed gives the same tokens.
"""

import math
from collections import Counter
from dataclasses import dataclass, field
from numbers import Integral, Real

import numpy as np

from .errors import PyllmError


MAX_TOP_LOGPROBS = 20  # OpenAI's limit on top_logprobs
MAX_LOGIT_BIAS = 300   # OpenAI's limit on logit_bias entries


def _is_int(value, low) -> bool:
    return isinstance(value, Integral) and not isinstance(value, bool) and value >= low


def _is_real(value) -> bool:
    # NaN compares False with everything, so it must be refused before the range checks
    return isinstance(value, Real) and not isinstance(value, bool) and math.isfinite(value)


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
    presence_penalty: float = 0.0   # OpenAI's: subtracted once from every token generated so far
    frequency_penalty: float = 0.0  # OpenAI's: subtracted once per time a token was generated
    logit_bias: dict[int, float] = field(default_factory=dict)  # token id -> added to its logit
    logprobs: int | None = None     # None: off; else the log-probability of each sampled token and its N best rivals
    prompt_logprobs: int | None = None  # the same for every prompt token after the first

    def __post_init__(self):
        if self.stop is None or isinstance(self.stop, str):
            self.stop = [] if self.stop is None else [self.stop]
        self.stop = list(self.stop)
        checks = [
            # 0 only to score a prompt
            (_is_int(self.max_tokens, 0 if self.prompt_logprobs is not None else 1),
             "max_tokens must be an integer >= 1"),
            (_is_real(self.temperature) and self.temperature >= 0, "temperature must be a number >= 0"),
            (_is_int(self.top_k, 0), "top_k must be an integer >= 0"),
            (_is_real(self.top_p) and 0 < self.top_p <= 1, "top_p must be in (0, 1]"),
            (_is_real(self.min_p) and 0 <= self.min_p <= 1, "min_p must be in [0, 1]"),
            (_is_real(self.repetition_penalty) and self.repetition_penalty > 0, "repetition_penalty must be > 0"),
            (self.seed is None or _is_int(self.seed, 0), "seed must be an integer >= 0"),
            (all(isinstance(s, str) and s for s in self.stop), "stop must be non-empty strings"),
            (_is_real(self.presence_penalty) and -2 <= self.presence_penalty <= 2,
             "presence_penalty must be in [-2, 2]"),
            (_is_real(self.frequency_penalty) and -2 <= self.frequency_penalty <= 2,
             "frequency_penalty must be in [-2, 2]"),
            (isinstance(self.logit_bias, dict) and len(self.logit_bias) <= MAX_LOGIT_BIAS,
             f"logit_bias must map at most {MAX_LOGIT_BIAS} token ids to biases"),
            (isinstance(self.logit_bias, dict)
             and all(_is_int(t, 0) and _is_real(b) and -100 <= b <= 100 for t, b in self.logit_bias.items()),
             "logit_bias must map token ids (integers >= 0) to numbers in [-100, 100]"),
            (self.logprobs is None or _is_int(self.logprobs, 0) and self.logprobs <= MAX_TOP_LOGPROBS,
             f"logprobs must be an integer in [0, {MAX_TOP_LOGPROBS}]"),
            (self.prompt_logprobs is None or _is_int(self.prompt_logprobs, 0)
             and self.prompt_logprobs <= MAX_TOP_LOGPROBS,
             f"prompt_logprobs must be an integer in [0, {MAX_TOP_LOGPROBS}]"),
        ]
        for ok, message in checks:
            if not ok:
                raise PyllmError(message)

    @property
    def adjusts_logits(self) -> bool:
        return bool(self.presence_penalty or self.frequency_penalty or self.logit_bias)

    def new_generator(self, stream: int = 0) -> np.random.Generator:
        """Stream 0 is the seed's own stream; choice i of an n > 1 request draws from stream i."""
        if stream == 0 or self.seed is None:
            return np.random.default_rng(self.seed)
        return np.random.default_rng([self.seed, stream])


def adjust_logits(logits, params: SamplingParams, output_counts: Counter) -> np.ndarray:
    """OpenAI's additive adjustments, on a copy: logit[t] -= count[t] * frequency_penalty
    + (count[t] > 0) * presence_penalty over the generated tokens, then += logit_bias[t]."""
    logits = np.array(logits, dtype=np.float32)
    if output_counts and (params.presence_penalty or params.frequency_penalty):
        ids = np.fromiter(output_counts.keys(), dtype=np.int64, count=len(output_counts))
        counts = np.fromiter(output_counts.values(), dtype=np.float32, count=len(output_counts))
        logits[ids] -= counts * params.frequency_penalty + params.presence_penalty
    for token, bias in params.logit_bias.items():
        logits[token] += bias
    return logits


def apply_repetition_penalty(logits, seen_ids, penalty):
    """Scale down logits of tokens already seen (prompt and output), as transformers does."""
    if penalty == 1.0 or len(seen_ids) == 0:
        return logits
    ids = np.unique(np.asarray(seen_ids))
    picked = logits[ids]
    logits[ids] = np.where(picked < 0, picked * penalty, picked / penalty)
    return logits


def _top_p_mask(probs, top_p):
    """True for the tokens top-p removes: those whose mass, together with every less likely token,
    is at most 1 - top_p (transformers' formulation, so boundary cases round the same way)."""
    order = np.argsort(probs, kind="stable")
    removed = np.cumsum(probs[order]) <= 1 - top_p
    removed[-1] = False  # the most likely token always stays
    mask = np.zeros(probs.size, dtype=bool)
    mask[order] = removed
    return mask


def probabilities(logits, params: SamplingParams, seen_ids=()) -> np.ndarray:
    """The distribution sample() draws from: float64 [vocab], exactly 0 for every filtered token."""
    scores = apply_repetition_penalty(np.array(logits, dtype=np.float64), seen_ids, params.repetition_penalty)
    top = scores.max()
    if not np.isfinite(top):
        # a device may hand back NaN, and extreme (valid) penalties overflow: keep the distribution
        # defined rather than failing every sequence batched with this one
        scores = np.nan_to_num(scores, nan=-np.inf, posinf=np.finfo(np.float64).max)
        top = scores.max()
    if params.temperature == 0 or not np.isfinite(top):
        return one_hot(int(np.argmax(scores)), scores.size)
    # subtracting the maximum before dividing keeps tiny temperatures from overflowing: the top
    # token scores exactly 0, so exp() below needs no second maximum
    scores -= top
    with np.errstate(over="ignore"):  # overflowing to -inf is the intended limit: probability 0
        scores /= params.temperature
    if 0 < params.top_k < scores.size:
        scores[scores < np.partition(scores, -params.top_k)[-params.top_k]] = -np.inf
    probs = np.exp(scores, out=scores)
    probs /= probs.sum()
    if params.top_p >= 1.0 and params.min_p == 0:
        return probs
    if params.top_p < 1.0:
        probs[_top_p_mask(probs, params.top_p)] = 0.0
    if params.min_p > 0:
        probs[probs < params.min_p * probs.max()] = 0.0
    return probs / probs.sum()


def one_hot(index: int, size: int) -> np.ndarray:
    probs = np.zeros(size)
    probs[index] = 1.0
    return probs


def sample(logits, params: SamplingParams, rng: np.random.Generator, seen_ids=()) -> int:
    """logits [vocab] f32 (host) -> next token id."""
    logits = np.asarray(logits)
    # greedy draws nothing, so it leaves the generator's stream alone; on finite logits without a
    # penalty it needs no distribution either (a finite maximum means no NaN and no +inf)
    if params.temperature == 0 and params.repetition_penalty == 1.0 and np.isfinite(logits.max()):
        return int(np.argmax(logits))
    probs = probabilities(logits, params, seen_ids)
    if params.temperature == 0:
        return int(np.argmax(probs))
    # inverse CDF with one uniform double: the draw rng.choice(vocab, p=probs) makes, without the
    # ~0.2 ms it spends checking probs (a batch of 8 samples every step)
    cdf = np.cumsum(probs)
    cdf /= cdf[-1]
    return int(cdf.searchsorted(rng.random(), side="right"))
