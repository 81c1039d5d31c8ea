"""One CUDA graph per decode-step shape (pyllm/backends/cuda_graph.py), through cuda-emu, whose
capture records the launches and whose replay runs the record, and through CuPy where there is a
GPU: replayed steps give the eager steps' logits, cost one launch each, refill their inputs, take a
new shape when a table outgrows its bound, and no host copy can slip into a capture."""

import numpy as np
import pytest

import pyllm
from conftest import make_tiny_model
from pyllm.backends.cuda_graph import MIN_BOUND, table_bound
from pyllm.errors import PyllmError
from pyllm.model import decode, prefill
from test_cuda_backend import backend  # noqa: F401 (a fixture: cuda-emu, and cuda where there is a GPU)
from test_gguf_model import write_tiny_gguf

STEPS = 16


@pytest.fixture(scope="module", params=["f32 safetensors", "q4_k_m-like gguf"])
def model_path(request, tmp_path_factory):
    path = tmp_path_factory.mktemp("graph")
    if request.param.endswith("gguf"):
        return str(write_tiny_gguf(path, "q4_k_m-like"))
    make_tiny_model(path, max_position_embeddings=512)
    return str(path)


def greedy_logits(llm, prompts, steps=STEPS):
    """Prefill each prompt, then `steps` greedy decode steps of all of them at once -> [steps, S, vocab]."""
    caches = [llm.model.new_cache() for _ in prompts]
    last = [int(np.argmax(prefill(llm.model, cache, prompt))) for cache, prompt in zip(caches, prompts)]
    rows = []
    for _ in range(steps):
        rows.append(decode(llm.model, caches, last))
        last = [int(t) for t in rows[-1].argmax(-1)]
    return np.stack(rows)


def test_table_bounds():
    assert [table_bound(n) for n in (1, 8, 9, 16, 17, 100)] == [MIN_BOUND, 8, 16, 16, 32, 128]


def test_replayed_steps_give_the_eager_logits(model_path, backend):  # noqa: F811
    """Three sequences, one of which outgrows the first bound (8 blocks, 128 tokens) midway."""
    prompts = [list(range(3, 123)), [7, 8, 9], list(range(40, 70))]
    llm = pyllm.LLM(model_path, backend=backend, dtype="f32", show_progress=False)
    llm.backend.use_graphs = False
    eager = greedy_logits(llm, prompts)
    eager_launches = llm.backend.launches
    llm.backend.use_graphs = True
    replayed = greedy_logits(llm, prompts)
    replayed_launches = llm.backend.launches - eager_launches
    graphs = llm.backend.graphs
    assert sorted(graphs.graphs) == [(3, 8), (3, 16)]  # the long sequence crossed 128 tokens
    assert graphs.replays == STEPS - 2  # each shape's first step ran eagerly
    np.testing.assert_allclose(replayed, eager, atol=1e-6 if backend == "cuda-emu" else 1e-4, rtol=0)
    assert replayed_launches < eager_launches / 2  # prefills alike; 14 of the 16 decode steps one launch each


def test_a_replayed_step_is_one_launch(model_path, backend):  # noqa: F811
    llm = pyllm.LLM(model_path, backend=backend, dtype="f32", show_progress=False)
    cache = llm.model.new_cache()
    prefill(llm.model, cache, [1, 5, 9])
    counts = []
    for token in range(4):  # eager warm-up, capture (+ its replay), then replays
        before = llm.backend.launches
        decode(llm.model, [cache], [token + 2])
        counts.append(llm.backend.launches - before)
    assert counts[0] == counts[1] - 1 > 10 and counts[2:] == [1, 1]


def test_nothing_is_copied_from_the_host_while_capturing(model_path):
    """CUDA refuses a host copy inside a capture; the backend says so in one line on both devices."""
    llm = pyllm.LLM(model_path, backend="cuda-emu", show_progress=False)
    with llm.backend.device.capture():
        with pytest.raises(PyllmError) as info:
            llm.backend.upload_ids([1, 2])
    assert "\n" not in str(info.value) and "captured" in str(info.value)
