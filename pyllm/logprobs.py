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


def log_softmax(logits) -> np.ndarray:
    """float64 [vocab]; computed in float64 so that log-probabilities near 0 keep their digits."""
    scores = np.asarray(logits, dtype=np.float64)
    scores = scores - scores.max()
    return scores - np.log(np.exp(scores).sum())


def token_logprob(logits, token_id: int, top_n: int) -> TokenLogprob:
    """How likely the distribution in `logits` made `token_id`, and its top_n best rivals."""
    logprobs = log_softmax(logits)
    best = np.argpartition(-logprobs, top_n)[:top_n] if 0 < top_n < logprobs.size else np.arange(min(top_n, logprobs.size))
    best = best[np.argsort(-logprobs[best], kind="stable")]
    return TokenLogprob(int(token_id), float(logprobs[token_id]),
                        [Candidate(int(t), float(logprobs[t])) for t in best])
