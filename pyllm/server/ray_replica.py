"""EngineReplica: one engine (LLM + Scheduler) as a Ray Serve deployment's replica.

The class is plain Python (ray_launch.deploy makes it a deployment) over the in-process server's
own LocalEngine (one scheduler, its JobStreams). Jobs arrive as wire dicts (job_to_wire); `generate` streams
their updates back: first None (accepted) or the RequestError that refused them, then lists of
Updates as they come. A cancelled call (the client went away) cancels the jobs.
"""

import asyncio
import os

from ..backends import THREADS_ENV
from ..engine import LLM
from ..errors import PyllmError
from ..jobs import Job
from .errors import RequestError
from .job_stream import engine_info
from .run import local_engine


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
        self.engine = local_engine(self.llm, max_running, max_queue, kv_memory_gb)
        self.llm.grammars.llg_tokenizer()
        self.engine.start()

    async def generate(self, wire_jobs: list[dict]):
        try:  # schemas compile off the event loop, which serves every other stream of this replica
            jobs = await asyncio.to_thread(lambda: [job_from_wire(w, self.llm.grammars) for w in wire_jobs])
            stream = await self.engine.open(jobs)
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

    async def stats(self) -> dict:
        return await self.engine.stats()

    def info(self) -> dict:
        return engine_info(self.engine.scheduler)

    def end_streams(self, grace_s: float):
        """The server is shutting down: streams in flight end within grace_s (Scheduler.shutdown)."""
        self.engine.shutdown(grace_s)

    def __del__(self):  # Serve is stopping this replica
        if getattr(self, "engine", None) is not None:
            self.engine.stop()
