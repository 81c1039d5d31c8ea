"""PrefixRouter and prompt_block_keys: prefix affinity, the load threshold, power of two choices,
replicas going down and coming back. No Ray needed."""

import random

import pyllm
from pyllm.backends.base import BLOCK_TOKENS
from pyllm.kv_blocks import prompt_block_keys
from pyllm.router import PrefixRouter

TURN_1 = list(range(3 * BLOCK_TOKENS + 5))
TURN_2 = TURN_1 + list(range(100, 140))


def test_prompt_block_keys_are_the_keys_the_cache_finds(tiny_llm):
    seq = tiny_llm.new_sequence(TURN_1, pyllm.SamplingParams(max_tokens=4))
    list(tiny_llm.run([seq]))
    later = tiny_llm.model.new_cache(len(TURN_2) + 4)
    assert later.match_prefix(TURN_2) == 3 * BLOCK_TOKENS  # turn 1's full blocks
    assert later.keys == prompt_block_keys(TURN_2)[:3] == prompt_block_keys(TURN_1)
    later.release()
    assert len(prompt_block_keys(list(range(2 * BLOCK_TOKENS)))) == 1  # the last token is always computed
    assert len(prompt_block_keys(list(range(2 * BLOCK_TOKENS + 1)))) == 2
    assert prompt_block_keys(TURN_1, "a")[0] != prompt_block_keys(TURN_1, "b")[0]


def test_turn_two_follows_turn_one():
    router = PrefixRouter(4, rng=random.Random(0))
    first = router.pick(prompt_block_keys(TURN_1))
    router.started(first, prompt_block_keys(TURN_1))
    router.finished(first)
    for other in range(4):  # other conversations load the replicas evenly
        router.started(other, prompt_block_keys([other + 1000] * 50))
    assert router.pick(prompt_block_keys(TURN_2)) == first
    assert router.matched(first, prompt_block_keys(TURN_2)) == len(prompt_block_keys(TURN_1))


def test_longest_match_wins():
    router = PrefixRouter(2)
    keys = prompt_block_keys(TURN_2)
    router.started(0, keys[:1])
    router.started(1, keys[:3])
    assert router.pick(keys) == 1


def test_a_busy_holder_is_passed_over_past_the_threshold():
    router = PrefixRouter(2, threshold=2, rng=random.Random(0))
    keys = prompt_block_keys(TURN_1)
    router.started(0, keys)
    router.started(0, [])
    router.started(0, [])  # 3 in flight on the holder, 0 on the other: 3 > 2
    assert router.pick(keys) == 1
    router.finished(0)     # 2 beyond the least loaded: within the threshold
    assert router.pick(keys) == 0


def test_no_match_takes_the_less_loaded_of_two():
    router = PrefixRouter(2, rng=random.Random(0))
    router.started(0, [])
    assert all(router.pick(prompt_block_keys(TURN_1)) == 1 for _ in range(20))
    spread = PrefixRouter(8, rng=random.Random(1))
    assert len({spread.pick([]) for _ in range(50)}) > 4  # idle replicas: chosen at random


def test_a_down_replica_gets_nothing_and_comes_back_empty():
    router = PrefixRouter(2, rng=random.Random(0))
    keys = prompt_block_keys(TURN_1)
    router.started(0, keys)
    router.finished(0)
    router.down(0)
    assert all(router.pick(keys) == 1 for _ in range(20))
    router.back(0)
    assert router.matched(0, keys) == 0
    router.down(0)
    router.down(1)
    assert router.pick(keys) in (0, 1)  # all down: Ray queues the request until one is back


def test_remembered_blocks_are_bounded():
    router = PrefixRouter(1, remembered=3)
    keys = prompt_block_keys(TURN_2)
    router.started(0, keys)
    assert len(router.blocks[0]) == 3 and router.matched(0, keys) == 0  # the oldest, leading ones went first
