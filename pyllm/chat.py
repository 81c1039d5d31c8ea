"""ChatSession: a multi-turn conversation that keeps its KV cache between turns.

Each turn renders the whole conversation with the model's chat template, finds how many of its
tokens the cache already holds (the longest common prefix) and prefills only the rest.
"""

from .errors import PyllmError
from .sampling import SamplingParams


def common_prefix(a, b) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


class ChatSession:
    def __init__(self, llm, system: str | None = None, sampling: SamplingParams | None = None):
        self.llm = llm
        self.system = system
        self.sampling = sampling or SamplingParams(max_tokens=512)
        self.cache = llm.model.new_cache()  # the whole context window; NumPy pages it in lazily
        self.cached_ids: list[int] = []     # the tokens whose K/V the cache holds, in order
        self.messages: list[dict] = []
        self.dropped_turns = 0              # turns forgotten to make room, for the caller to report
        self.last_sequence = None           # the latest turn's Sequence (stats, finish reason)

    def reset(self):
        self.messages, self.cached_ids = [], []
        self.cache.truncate(0)

    def _conversation(self, user_text: str) -> list[dict]:
        system = [{"role": "system", "content": self.system}] if self.system else []
        return system + self.messages + [{"role": "user", "content": user_text}]

    def _prompt_ids(self, user_text: str, max_tokens: int) -> list[int]:
        """The rendered conversation, dropping the oldest turns until it and the answer fit."""
        self.dropped_turns = 0
        while True:
            ids = self.llm.tokenizer.encode_chat(self._conversation(user_text))
            if len(ids) + max_tokens <= self.cache.capacity:
                return ids
            if not self.messages:
                raise PyllmError(f"message too long: {len(ids)} tokens plus {max_tokens} to generate "
                                 f"exceed the context window of {self.cache.capacity}")
            self.messages = self.messages[2:]  # one user turn and its answer
            self.dropped_turns += 1

    def send(self, user_text: str, sampling: SamplingParams | None = None):
        """Start a turn -> a generator of the answer's text pieces. The conversation is rendered
        (and old turns dropped) right away; the turn is recorded even if the caller stops early."""
        params = sampling or self.sampling
        max_tokens = min(params.max_tokens, self.cache.capacity // 2)
        ids = self._prompt_ids(user_text, max_tokens)
        # reuse the cached prefix; at least one token must be fed to get logits
        reused = min(common_prefix(self.cached_ids, ids), len(ids) - 1)
        self.cache.truncate(reused)
        seq = self.llm.new_sequence(ids, params, cache=self.cache, cached_tokens=reused)
        self.last_sequence = seq
        return self._answer(user_text, ids, seq)

    def _answer(self, user_text, ids, seq):
        try:
            for _, piece in self.llm.run([seq]):
                if piece:
                    yield piece
        finally:  # also on Ctrl-C or a closed generator: keep the conversation and cache consistent
            fed = ids + seq.output_ids
            self.cached_ids = fed[:self.cache.length]
            self.messages += [{"role": "user", "content": user_text}, {"role": "assistant", "content": seq.text}]
