"""What the scheduler is given and hands back: a Job (one prompt, n choices), its Updates, its Usage."""

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from .logprobs import TokenLogprob
from .sampling import SamplingParams


@dataclass
class Usage:
    prompt_tokens: int
    cached_tokens: int          # prompt tokens whose K/V blocks were cached, not prefilled
    completion_tokens: int
    ttft_s: float | None        # arrival to first token
    tpot_s: float | None        # mean time per output token after the first


@dataclass
class Update:
    """What a sink receives about one choice: new text and its new tokens' log-probabilities. A
    choice's last update has its finish reason; the job's last update is `final` and has the usage."""
    text: str = ""
    finish_reason: str | None = None   # "stop" | "length" | "error"
    usage: Usage | None = None
    error: str | None = None
    choice: int = 0
    logprobs: list[TokenLogprob] = field(default_factory=list)
    prompt_logprobs: list[TokenLogprob | None] | None = None  # once per choice, with its first update
    final: bool = False


@dataclass(eq=False)
class Job:
    prompt_ids: list[int]
    params: SamplingParams
    sink: Callable[[Update], None]
    salt: str = ""                     # KV blocks are shared only among jobs with the same salt
    n: int = 1                         # choices, each sampled from its own seed stream
    constraint: object = None          # a grammar.Constraint for every choice's output, or None
    arrived: float = field(default_factory=time.perf_counter)
    cancelled: bool = False
    sequences: list = field(default_factory=list)  # the engine's Sequences while running, by choice
    choices_done: int = 0              # choices whose last update has gone out

    @property
    def first(self):
        return self.sequences[0]
