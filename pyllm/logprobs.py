"""Token log-probabilities: the log-softmax of the model's raw logits (before penalties, bias,
grammar masks or temperature, as vLLM returns them by default), with the N most likely tokens."""

from dataclasses import dataclass

import numpy as np


@dataclass
class Candidate:
    token_id: int
    logprob: float


@dataclass
class TokenLogprob:
    token_id: int
    logprob: float
    top: list[Candidate]  # the most likely tokens at this position, best first


def log_normalizer(logits) -> float:
    """log(sum(exp(logits))), in float64 so that log-probabilities near 0 keep their digits."""
    scores = np.asarray(logits, dtype=np.float64)
    top = scores.max()
    return float(top + np.log(np.exp(scores - top).sum()))


def token_logprob(logits, token_id: int, top_n: int) -> TokenLogprob:
    """How likely the distribution in `logits` made `token_id`, and its top_n best rivals. One pass
    for the normalizer; the rivals are found on the raw logits, which rank tokens alike."""
    logits = np.asarray(logits)
    normalizer = log_normalizer(logits)
    top_n = min(top_n, logits.size)
    best = np.argpartition(-logits, top_n - 1)[:top_n] if 0 < top_n < logits.size else np.arange(top_n)
    best = best[np.argsort(-logits[best], kind="stable")]
    return TokenLogprob(int(token_id), float(logits[token_id]) - normalizer,
                        [Candidate(int(t), float(logits[t]) - normalizer) for t in best])
