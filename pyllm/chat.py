"""ChatSession: a multi-turn conversation whose turns share their KV blocks.

Each turn renders the whole conversation with the model's chat template; its prompt starts with
the blocks the pool already holds for those tokens (the earlier turns, kept by content after the
previous turn's cache let go of them: kv_blocks.py), so only the rest is prefilled.
"""

from .errors import PyllmError
from .sampling import SamplingParams


CHAT_MAX_TOKENS = 512  # a chat answer's default length


class ChatSession:
    def __init__(self, llm, system: str | None = None, sampling: SamplingParams | None = None):
        self.llm = llm
        self.system = system
        self.sampling = sampling or SamplingParams(max_tokens=CHAT_MAX_TOKENS)
        self.context = llm.config.max_position_embeddings
        self.messages: list[dict] = []
        self.dropped_turns = 0              # turns forgotten to make room, for the caller to report
        self.last_sequence = None           # the latest turn's Sequence (stats, finish reason)
        self._streaming = None              # the answer generator of the latest turn

    def reset(self):
        self._close_answer()
        self.messages, self.dropped_turns, self.last_sequence = [], 0, None

    def _conversation(self, messages, user_text: str) -> list[dict]:
        system = [{"role": "system", "content": self.system}] if self.system else []
        return system + messages + [{"role": "user", "content": user_text}]

    def _fit(self, user_text: str, max_tokens: int):
        """Drop the oldest turns until the prompt leaves room for the answer (at most half the
        window, so one long answer cannot evict the whole history) -> (messages kept, prompt ids).
        Nothing changes when even the message alone does not fit."""
        room = min(max_tokens, self.context // 2)
        messages = self.messages
        while True:
            ids = self.llm.tokenizer.encode_chat(self._conversation(messages, user_text))
            if len(ids) + room <= self.context or not messages:
                break
            messages = messages[2:]  # one user turn and its answer
        if len(ids) >= self.context:
            raise PyllmError(f"message too long: the conversation needs {len(ids)} tokens, "
                             f"the context window is {self.context}")
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
        seq = self.llm.new_sequence(ids, params, capacity=self.context)
        self.last_sequence = seq
        self._streaming = self._answer(user_text, seq)
        return self._streaming

    def _close_answer(self):
        if self._streaming is not None:
            self._streaming.close()
            self._streaming = None

    def _answer(self, user_text, seq):
        try:
            for _, piece in self.llm.run([seq]):
                if piece:
                    yield piece
        finally:  # also on Ctrl-C or a closed generator: keep the conversation consistent
            if not seq.finished:
                seq.abort()
            seq.cache.release()  # its full blocks stay cached for the next turn
            self.messages = self.messages + [{"role": "user", "content": user_text},
                                             {"role": "assistant", "content": seq.text}]
