"""ChatSession: a multi-turn conversation that keeps its KV cache between turns.

Each turn renders the whole conversation with the model's chat template, finds how many of its
tokens the cache already holds (the longest common prefix) and prefills only the rest.
"""

from .errors import PyllmError
from .sampling import SamplingParams


CHAT_MAX_TOKENS = 512  # a chat answer's default length

def common_prefix(a, b) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def reusable_prefix(cached_ids, ids) -> int:
    """Tokens of `ids` whose cached K/V can be kept: the common prefix, less the last token of
    `ids`, which must be fed again to get logits."""
    return min(common_prefix(cached_ids, ids), len(ids) - 1)


class ChatSession:
    def __init__(self, llm, system: str | None = None, sampling: SamplingParams | None = None):
        self.llm = llm
        self.system = system
        self.sampling = sampling or SamplingParams(max_tokens=CHAT_MAX_TOKENS)
        self.cache = llm.model.new_cache()  # the whole context window, allocated as it fills
        self.cached_ids: list[int] = []     # the tokens whose K/V the cache holds, in order
        self.messages: list[dict] = []
        self.dropped_turns = 0              # turns forgotten to make room, for the caller to report
        self.last_sequence = None           # the latest turn's Sequence (stats, finish reason)
        self._streaming = None              # the answer generator of the latest turn

    def reset(self):
        self._close_answer()
        self.messages, self.cached_ids = [], []
        self.dropped_turns, self.last_sequence = 0, None
        self.cache.truncate(0)

    def _conversation(self, messages, user_text: str) -> list[dict]:
        system = [{"role": "system", "content": self.system}] if self.system else []
        return system + messages + [{"role": "user", "content": user_text}]

    def _fit(self, user_text: str, max_tokens: int):
        """Drop the oldest turns until the prompt leaves room for the answer (at most half the
        window, so one long answer cannot evict the whole history) -> (messages kept, prompt ids).
        Nothing changes when even the message alone does not fit."""
        room = min(max_tokens, self.cache.capacity // 2)
        messages = self.messages
        while True:
            ids = self.llm.tokenizer.encode_chat(self._conversation(messages, user_text))
            if len(ids) + room <= self.cache.capacity or not messages:
                break
            messages = messages[2:]  # one user turn and its answer
        if len(ids) >= self.cache.capacity:
            raise PyllmError(f"message too long: the conversation needs {len(ids)} tokens, "
                             f"the context window is {self.cache.capacity}")
        return messages, ids

    def send(self, user_text: str, sampling: SamplingParams | None = None):
        """Start a turn -> a generator of the answer's text pieces. The conversation is rendered
        (and old turns dropped) right away; once the generator has started, the turn is recorded
        even if the caller stops early. An answer still streaming is stopped first."""
        params = sampling or self.sampling
        self._close_answer()
        messages, ids = self._fit(user_text, params.max_tokens)
        self.dropped_turns = (len(self.messages) - len(messages)) // 2
        self.messages = messages
        reused = reusable_prefix(self.cached_ids, ids)
        self.cache.truncate(reused)
        self.cached_ids = ids[:reused]
        seq = self.llm.new_sequence(ids, params, cache=self.cache, cached_tokens=reused)
        self.last_sequence = seq
        self._streaming = self._answer(user_text, ids, seq)
        return self._streaming

    def _close_answer(self):
        if self._streaming is not None:
            self._streaming.close()
            self._streaming = None

    def _answer(self, user_text, ids, seq):
        try:
            for _, piece in self.llm.run([seq]):
                if piece:
                    yield piece
        finally:  # also on Ctrl-C or a closed generator: keep the conversation and cache consistent
            if not seq.finished:
                seq.abort()
            self.cached_ids = seq.cached_ids
            self.messages = self.messages + [{"role": "user", "content": user_text},
                                             {"role": "assistant", "content": seq.text}]
