"""Continuous batching: one engine thread owns the LLM and steps every running sequence together.

Iteration-level scheduling: each step is one LLM.step over all decoding sequences plus as many
prefilling ones as the per-step prefill budget allows (prompts are prefilled in chunks), so a long
prompt never stalls running streams for long. Waiting jobs are admitted, first come first served,
while a batch slot is free and the model's KV pool has blocks for their first prompt chunk:
sequences take blocks as they grow (kv_blocks.py), nothing is reserved for max_tokens. When the
pool runs out mid-step, the latest admitted sequences give their blocks back and recompute later
(LLM.reserve). Finished and cancelled sequences leave the batch at once; their full blocks stay
cached by content, so a later prompt with the same prefix (the next turn of a conversation, a
shared system prompt) starts from them; `salt` keeps tenants from sharing.

A job with n > 1 choices prefills its prompt once; the other choices then share its blocks
(Sequence.spawn_choices) and run as sequences of their own.

No HTTP here: results go to each job's `sink` callback, called on the engine thread.
"""

import collections
import ctypes
import logging
import threading
import time

from .errors import PyllmError
from .jobs import Job, Update, Usage
from .backends.base import BLOCK_TOKENS

log = logging.getLogger("pyllm.scheduler")
# prompt tokens prefilled per step: small enough that running streams keep flowing past a long
# prompt (a 256-token chunk costs about seven decode steps of 8 streams on SmolLM2 here), large
# enough to fill GEMMs
PREFILL_BUDGET = 256
# serving defaults, shared by `pyllm serve`, make_server and Scheduler
MAX_RUNNING, MAX_QUEUE, KV_MEMORY_GB = 32, 256, 4.0


def return_freed_memory():
    """Hand the heap that finished requests freed back to the OS (glibc keeps it otherwise), so an
    idle server's RSS returns to its idle level after a burst of load."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to do
        pass


class QueueFull(Exception):
    """No room to wait: the queue is full or the scheduler is shutting down."""


class Scheduler:
    def __init__(self, llm, max_running=MAX_RUNNING, max_queue=MAX_QUEUE, kv_budget_bytes=int(KV_MEMORY_GB * 2**30),
                 prefill_budget=PREFILL_BUDGET):
        self.llm = llm
        self.max_running, self.max_queue, self.prefill_budget = max_running, max_queue, prefill_budget
        self.pool = llm.model.resize_kv_pool(kv_budget_bytes)
        self._waiting: collections.deque[Job] = collections.deque()
        self._running: list[Job] = []      # admission order; touched by the engine thread only
        self._cond = threading.Condition()
        self._accepting, self._closing, self._deadline = True, False, None
        # keys fixed up front, so another thread can copy the counter while this one counts
        self.counters = collections.Counter(steps=0, prompt_tokens=0, cached_tokens=0, generated_tokens=0)
        self.batch_sizes = collections.Counter()        # sequences per step -> steps
        self._thread = threading.Thread(target=self._loop, name="pyllm-engine", daemon=True)

    # ---- the asyncio side -----------------------------------------------------------------
    def submit(self, job: Job):
        need = -(-(len(job.prompt_ids) + 1) // BLOCK_TOKENS)  # the prompt and a first token
        if need > self.pool.n_blocks:
            raise PyllmError(f"the prompt needs {need * self.pool.block_bytes / 2**20:.1f} MiB of KV cache, more than "
                             f"the server's {self.pool.n_blocks * self.pool.block_bytes / 2**20:.1f} MiB")
        with self._cond:
            if not self._accepting:
                raise QueueFull("the server is shutting down")
            if len(self._waiting) >= self.max_queue:
                raise QueueFull(f"the server is busy: {len(self._waiting)} requests are waiting")
            self._waiting.append(job)
            self._cond.notify()

    def cancel(self, job: Job):
        """Drop a job (its client went away): it leaves the batch before the next step."""
        with self._cond:
            job.cancelled = True
            self._cond.notify()

    def start(self):
        self._thread.start()

    def shutdown(self, grace_s: float):
        """Refuse new jobs; jobs in flight may run for grace_s more seconds, then running ones end
        with finish reason 'length' and waiting ones with an error."""
        with self._cond:
            self._accepting = False
            deadline = time.monotonic() + grace_s
            self._deadline = deadline if self._deadline is None else min(self._deadline, deadline)
            self._cond.notify()

    def stop(self, timeout_s: float = 10.0):
        self.shutdown(0.0)
        with self._cond:
            self._closing = True
            self._cond.notify()
        if self._thread.is_alive():
            self._thread.join(timeout_s)

    def stats(self) -> dict:
        running = list(self._running)
        return {
            "running": len(running), "waiting": len(self._waiting),
            "running_sequences": sum(1 for j in running for s in list(j.sequences) if not s.finished),
            **self.pool.stats(), "block_bytes": self.pool.block_bytes,
            "batch_sizes": dict(self.batch_sizes), **self.counters,
        }

    # ---- the engine thread ----------------------------------------------------------------
    def _loop(self):
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._running or self._waiting or self._closing)
                if self._closing and not (self._running or self._waiting):
                    return
                self._drop_cancelled()
                if self._deadline is not None and time.monotonic() >= self._deadline:
                    self._cut_short()
                admitted = self._take_admissible()
            for job in admitted:  # outside the lock: allocating and copying caches takes a while
                self._begin(job)
            if self._running:
                self._step()
                if not (self._running or self._waiting):
                    return_freed_memory()

    def _drop_cancelled(self):
        self._waiting = collections.deque(j for j in self._waiting if not j.cancelled)
        for job in [j for j in self._running if j.cancelled]:
            self._release(job)

    def _cut_short(self):
        for job in self._waiting:
            self._emit(job, Update(finish_reason="error", error="the server is shutting down", final=True))
        self._waiting.clear()
        for job in list(self._running):
            job.first.extra_choices = 0  # a prompt still prefilling ends with its first choice only
            for seq in [s for s in job.sequences if not s.finished]:
                seq.finish_reason = "length"
                self._choice_done(job, seq, "")

    def _take_admissible(self) -> list[Job]:
        """Waiting jobs that fit now, in order: first come first served, so a big job is not
        overtaken forever."""
        taken, blocks = [], self.pool.available()
        while self._waiting and len(self._running) + len(taken) < self.max_running:
            first_chunk = min(len(self._waiting[0].prompt_ids), self.prefill_budget)
            blocks -= -(-first_chunk // BLOCK_TOKENS)
            if blocks < 0 and (self._running or taken):  # alone, a job always goes (it may preempt no one)
                break
            taken.append(self._waiting.popleft())
        return taken

    def _begin(self, job: Job):
        try:
            self._start_sequence(job)
        except PyllmError as exc:  # the server validates first; this keeps the engine alive regardless
            self._emit(job, Update(finish_reason="error", error=str(exc), final=True))

    def _start_sequence(self, job: Job):
        sequence = self.llm.new_sequence(job.prompt_ids, job.params, constraint=job.constraint, salt=job.salt)
        sequence.extra_choices = job.n - 1
        job.sequences = [sequence]
        self.counters["prompt_tokens"] += len(job.prompt_ids)
        self._running.append(job)

    def _pick_batch(self) -> list:
        """Every decoding sequence, plus prefilling ones in admission order within the prefill
        budget (the first always goes, so a chunk larger than the budget still progresses)."""
        batch, budget = [], self.prefill_budget
        for job in self._running:
            running = [s for s in job.sequences if not s.finished]
            pending = max((len(s.pending_ids) for s in running), default=0)  # 1 while decoding
            chunk = min(pending, self.prefill_budget) if pending > 1 else 0
            if chunk > budget:
                continue
            batch += running
            budget -= chunk
        return batch

    def _step(self):
        batch = self._pick_batch()
        job_of = {id(seq): job for job in self._running for seq in job.sequences}
        try:
            events = self.llm.step(batch, prefill_chunk=self.prefill_budget)
        except Exception as exc:  # the batch's caches may be half-written: fail those jobs, keep serving
            log.exception("engine step failed")
            for job in {id(job_of[id(seq)]): job_of[id(seq)] for seq in batch}.values():
                self._release(job)
                self._emit(job, Update(finish_reason="error", error=f"engine error: {type(exc).__name__}: {exc}",
                                       final=True))
            return
        self.counters["steps"] += 1
        self.counters["generated_tokens"] += len(events)
        self.batch_sizes[len(batch)] += 1
        for sequence, _ in events:
            if id(sequence) not in job_of:  # a choice spawned in this step
                job_of[id(sequence)] = job_of[id(sequence.spawned_from)]
                job_of[id(sequence)].sequences.append(sequence)
        for sequence, text in events:
            job = job_of[id(sequence)]
            if sequence.finished:
                self._choice_done(job, sequence, text)
            else:
                update = self._update(sequence, text)
                if update.text or update.logprobs or update.prompt_logprobs:
                    self._emit(job, update)

    @staticmethod
    def _update(sequence, text: str, **fields) -> Update:
        """The news of a sequence's latest step: its text and its new token's log-probabilities."""
        first = len(sequence.output_ids) <= 1
        return Update(text, choice=sequence.choice, logprobs=sequence.logprobs[-1:],
                      prompt_logprobs=sequence.prompt_logprobs if first and sequence.params.prompt_logprobs
                      is not None else None, **fields)

    def _choice_done(self, job: Job, seq, text: str):
        """One choice has finished; the last one to finish ends the job."""
        job.choices_done += 1
        done = job.choices_done == len(job.sequences) and not job.first.extra_choices
        usage = self._usage(job) if done else None
        if done:
            self.counters["cached_tokens"] += job.first.cached_tokens
            self._release(job)
        self._emit(job, self._update(seq, text, finish_reason=seq.finish_reason, usage=usage, final=done))

    def _usage(self, job: Job) -> Usage:
        first, now = job.first.first_token_at, time.perf_counter()
        n_first = len(job.first.output_ids)
        return Usage(len(job.prompt_ids), job.first.cached_tokens, sum(len(s.output_ids) for s in job.sequences),
                     first - job.arrived if first else None,
                     (now - first) / (n_first - 1) if first and n_first > 1 else None)

    def _release(self, job: Job):
        for seq in job.sequences:
            if not seq.finished:
                seq.abort()
            seq.cache.release()  # full blocks stay cached by content for later prompts
        self._running.remove(job)
        job.sequences = []

    def _emit(self, job: Job, update: Update):
        try:
            job.sink(update)
        except Exception:  # a sink whose consumer is gone must not stop the engine
            log.exception("dropping a job whose sink failed")
            job.cancelled = True
