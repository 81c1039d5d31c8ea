"""Log-probabilities in OpenAI's two shapes: chat's per-token entries and the legacy completions'
parallel lists (tokens, token_logprobs, top_logprobs, text_offset)."""

from ..logprobs import TokenLogprob


class LogprobsShaper:
    def __init__(self, tokenizer, grammars):
        self.tokenizer, self.grammars = tokenizer, grammars

    def text(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id], skip_special_tokens=False)

    def _entry(self, token_id: int, logprob: float) -> dict:
        return {"token": self.text(token_id), "logprob": logprob,
                "bytes": list(self.grammars.token_bytes(token_id))}

    def chat(self, entries: list[TokenLogprob]) -> dict:
        """{"content": [{token, logprob, bytes, top_logprobs: [{token, logprob, bytes}]}], "refusal": None}"""
        return {"content": [{**self._entry(e.token_id, e.logprob),
                             "top_logprobs": [self._entry(c.token_id, c.logprob) for c in e.top]}
                            for e in entries], "refusal": None}

    def completion(self, token_ids: list[int], entries: list[TokenLogprob | None], offset: int = 0) -> dict:
        """Entry i scores token_ids[i] (None: the prompt's first token, which nothing scores); each
        top_logprobs dict also holds the token itself, as OpenAI's does. text_offset counts from
        `offset`, in characters of the returned text."""
        tokens = [self.text(t) for t in token_ids]
        offsets = []
        for token in tokens:
            offsets.append(offset)
            offset += len(token)
        return {"tokens": tokens, "token_logprobs": [e.logprob if e else None for e in entries],
                "top_logprobs": [None if e is None else {**{self.text(c.token_id): c.logprob for c in e.top},
                                                         self.text(e.token_id): e.logprob} for e in entries],
                "text_offset": offsets}


def merge_completion_logprobs(first: dict, second: dict) -> dict:
    return {key: first[key] + second[key] for key in first}
