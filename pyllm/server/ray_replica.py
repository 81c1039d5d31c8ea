"""EngineReplica: one engine (LLM + Scheduler) as a Ray Serve deployment's replica.

The class is plain Python (ray_engine.py makes it a deployment), and runs the same scheduler and
JobStream as the in-process server. Jobs arrive as wire dicts (job_to_wire); `generate` streams
their updates back: first None (accepted) or the RequestError that refused them, then lists of
Updates as they come. A cancelled call (the client went away) cancels the jobs.
"""

import os

from ..backends import THREADS_ENV
from ..engine import LLM
from ..errors import PyllmError
from ..jobs import Job
from ..scheduler import Scheduler
from .errors import RequestError
from .job_stream import JobStream, engine_info


def job_to_wire(job: Job) -> dict:
    """What a replica needs of a job: no sink, and its constraint as the schema to compile again."""
    return {"prompt_ids": job.prompt_ids, "params": job.params, "salt": job.salt, "n": job.n,
            "schema": job.constraint.schema if job.constraint is not None else None}


def job_from_wire(wire: dict, grammars) -> Job:
    constraint = grammars.json_schema(wire["schema"]) if wire["schema"] is not None else None
    return Job(wire["prompt_ids"], wire["params"], None, salt=wire["salt"], n=wire["n"], constraint=constraint)


class EngineReplica:
    def __init__(self, model: str, threads: int, backend: str, dtype: str | None, quantize: str | None,
                 max_running: int, max_queue: int, kv_memory_gb: float):
        os.environ[THREADS_ENV] = str(threads)  # this process's kernels, read when they first load
        self.llm = LLM(model, backend=backend, dtype=dtype, quantize=quantize, show_progress=False)
        self.scheduler = Scheduler(self.llm, max_running, max_queue, int(kv_memory_gb * 2**30))
        self.llm.grammars.llg_tokenizer()
        self.scheduler.start()

    async def generate(self, wire_jobs: list[dict]):
        try:
            stream = JobStream(self.scheduler, [job_from_wire(w, self.llm.grammars) for w in wire_jobs])
        except RequestError as exc:
            yield exc
            return
        except PyllmError as exc:
            yield RequestError(str(exc))
            return
        yield None
        try:
            async for batch in stream.batches():
                yield batch
        finally:
            stream.close()

    def stats(self) -> dict:
        return self.scheduler.stats()

    def info(self) -> dict:
        return engine_info(self.scheduler)

    def end_streams(self, grace_s: float):
        """The server is shutting down: streams in flight end within grace_s (Scheduler.shutdown)."""
        self.scheduler.shutdown(grace_s)

    def __del__(self):  # Serve is stopping this replica
        if getattr(self, "scheduler", None) is not None:
            self.scheduler.stop()
