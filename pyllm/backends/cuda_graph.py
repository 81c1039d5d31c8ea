"""One CUDA graph per decode-step shape: the step's launches captured once, then replayed.

A decode step of S sequences makes ~9 launches a layer from Python; as a graph it is one replay.
What a graph captures is fixed: kernel arguments, grids, every array's address. So the step's
inputs live in buffers of their own, refilled from the host before each replay:

    ids     int64 [S]            the step's token ids
    tokens  int32 [S, 2]         each sequence's position and where its table starts (s * bound)
    tables  int32 [S, bound]     each sequence's blocks, bound a power of two >= its longest table

and attention is captured for the most keys those tables can hold (bound x BLOCK_TOKENS), its
splits and chunk fixed by that bound (a sequence sees only its own keys: the rest are empty
splits). A shape is (S, bound). Its first step runs eagerly (a warm-up: CuPy's pool then holds
the step's allocations), its second is captured and then replayed, as every later one is. A
sequence outgrowing the bound takes the next shape; the KV pool's arrays growing (new addresses)
drops every graph. The arrays a capture allocates are kept with its graph, so nothing it writes
is ever handed to anyone else. The device (cuda_device.py) captures: CuPy by stream capture,
cuda-emu by recording its launches and running them again.
"""

from dataclasses import dataclass, field

import numpy as np

from .base import BLOCK_TOKENS, Step
from .cuda_attention import StepTokens, token_rows

MIN_BOUND = 8  # blocks a graph's tables hold at least (128 tokens)


def table_bound(blocks: int) -> int:
    """The power of two >= blocks (at least MIN_BOUND) that a graph's tables are sized for."""
    return max(MIN_BOUND, 1 << (blocks - 1).bit_length())


@dataclass
class DecodeGraph:
    """A captured decode step of one shape, with its input buffers and its output."""
    graph: object   # the device's replayable graph
    ids: object     # device int64 [S]
    tokens: object  # device int32 [S, 2]
    tables: object  # device int32 [S, bound]
    logits: object  # device [S, vocab]: what each replay writes
    kept: list = field(default_factory=list)  # every array the capture allocated


class DecodeGraphs:
    """The decode graphs of one CudaBackend, by shape (S, bound)."""

    def __init__(self, backend):
        self.backend = backend
        self.graphs = {}     # (S, bound) -> DecodeGraph
        self.warmed = set()  # shapes whose eager first step has run
        self.pool = None     # the KV pool's keys array the graphs were captured over
        self.replays = 0

    def run(self, logits_of, ids, step: Step):
        """logits [S, vocab] on the device from a replay, or None for the eager warm-up step."""
        keys = step.slots[0].keys
        if keys is not self.pool:  # new pool arrays: every captured address is stale
            self.graphs.clear(), self.warmed.clear()
            self.pool = keys
        shape = (len(ids), table_bound(max(len(slot.table) for slot in step.slots)))
        graph = self.graphs.get(shape)
        if graph is None:
            if shape not in self.warmed:
                self.warmed.add(shape)
                return None
            graph = self.graphs[shape] = self._capture(logits_of, step, *shape)
        self._fill(graph, ids, step, shape[1])
        self.backend.device.replay(graph.graph)
        self.backend.launches += 1
        self.replays += 1
        return graph.logits

    def _capture(self, logits_of, step: Step, n_sequences: int, bound: int) -> DecodeGraph:
        be, xp = self.backend, self.backend.xp
        ids, tokens = xp.zeros(n_sequences, np.int64), xp.zeros((n_sequences, 2), np.int32)
        tables = xp.zeros((n_sequences, bound), np.int32)
        captured = Step(step.slots, step.starts, device=StepTokens(tokens, tables.reshape(-1), bound * BLOCK_TOKENS))
        with be.device.capture() as capture:
            logits = logits_of(ids, captured)
        return DecodeGraph(capture.graph, ids, tokens, tables, logits, capture.kept)

    def _fill(self, graph: DecodeGraph, ids, step: Step, bound: int):
        """The step's host inputs into the graph's buffers (on the stream the graph replays on)."""
        tokens = token_rows(step.slots, bound * np.arange(len(step.slots)))
        tables = np.zeros((len(step.slots), bound), np.int32)
        for s, slot in enumerate(step.slots):
            tables[s, :len(slot.table)] = slot.table
        device = self.backend.device
        device.copy_in(graph.ids, np.asarray(ids, np.int64))
        device.copy_in(graph.tokens, tokens)
        device.copy_in(graph.tables, tables)
