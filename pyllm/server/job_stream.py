"""A request's scheduler jobs seen from the event loop: UpdateStream (what the HTTP side reads),
JobStream (jobs on this process's scheduler) and LocalEngine (the app's view of that scheduler)."""

import asyncio
import dataclasses
import os

from ..backends import kernel_threads
from ..errors import PyllmError
from ..jobs import Job, Usage
from ..scheduler import QueueFull, Scheduler
from .errors import RequestError


class UpdateStream:
    """A request's updates from wherever its jobs run, in batches from `batches()`: every
    update until each job's final one (an error ends the stream at once), the usage summed."""

    replica: int | None = None  # which engine replica runs the jobs, where there are several

    def __init__(self, n_jobs: int):
        self.open = n_jobs
        self.usage = Usage(0, 0, 0, None, None)

    async def batches(self):
        raise NotImplementedError

    async def updates(self):
        async for batch in self.batches():
            for update in batch:
                yield update

    async def counted(self, received):
        """The updates of received (an async iterator of lists), cut at the end: each job's final
        update counted, usage summed, an error ending everything."""
        async for batch in received:
            taken = []
            for update in batch:
                taken.append(update)
                if update.final:
                    self.open -= 1
                    self._add_usage(update.usage)
                if update.error:
                    self.open = 0
                if not self.open:
                    break
            yield taken
            if not self.open:
                return

    def _add_usage(self, usage: Usage | None):
        if usage is not None:
            first = self.usage.prompt_tokens == 0
            self.usage = Usage(self.usage.prompt_tokens + usage.prompt_tokens,
                               self.usage.cached_tokens + usage.cached_tokens,
                               self.usage.completion_tokens + usage.completion_tokens,
                               usage.ttft_s if first else self.usage.ttft_s, usage.tpot_s if first else self.usage.tpot_s)

    def close(self):
        raise NotImplementedError


class JobStream(UpdateStream):
    """Jobs (one per prompt, each with n choices) on this process's scheduler: their updates
    arrive on one asyncio queue, choices numbered across the jobs in prompt order."""

    def __init__(self, scheduler: Scheduler, jobs: list[Job]):
        super().__init__(len(jobs))
        loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue = asyncio.Queue()
        self.scheduler, self.jobs = scheduler, jobs
        for offset, job in enumerate(jobs):
            job.sink = lambda update, base=offset * job.n: loop.call_soon_threadsafe(
                self.queue.put_nowait, dataclasses.replace(update, choice=base + update.choice))
        try:
            for job in jobs:
                scheduler.submit(job)
        except QueueFull as exc:
            self.close()
            raise RequestError.overloaded(str(exc)) from None
        except PyllmError as exc:
            self.close()
            raise RequestError(str(exc)) from None

    async def _queued(self):
        while True:  # what has arrived, at least one update
            batch = [await self.queue.get()]
            while not self.queue.empty():
                batch.append(self.queue.get_nowait())
            yield batch

    def batches(self):
        return self.counted(self._queued())

    def close(self):
        for job in self.jobs:
            self.scheduler.cancel(job)


def rss_bytes() -> int | None:
    """This process's resident memory (Linux), or None where /proc is not there."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def engine_info(scheduler: Scheduler) -> dict:
    """What /replicas shows of one engine: its process, its kernels' threads and its load."""
    stats = scheduler.stats()
    return {"pid": os.getpid(), "rss_bytes": rss_bytes(), "threads": kernel_threads(), "running": stats["running"],
            "waiting": stats["waiting"]}


class LocalEngine:
    """The app's engine in this process: one scheduler."""

    def __init__(self, scheduler: Scheduler):
        self.scheduler = scheduler

    def start(self):
        self.scheduler.start()

    def shutdown(self, grace_s: float):
        self.scheduler.shutdown(grace_s)

    def stop(self):
        self.scheduler.stop()

    async def open(self, jobs: list[Job]) -> JobStream:
        return JobStream(self.scheduler, jobs)

    async def stats(self) -> dict:
        return self.scheduler.stats()

    async def replicas(self) -> list[dict]:
        return [{"replica": 0, "up": True, **engine_info(self.scheduler)}]
