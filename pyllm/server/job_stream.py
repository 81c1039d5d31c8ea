"""JobStream: a request's scheduler jobs seen from the event loop."""

import asyncio
import dataclasses

from ..errors import PyllmError
from ..jobs import Job, Usage
from ..scheduler import QueueFull, Scheduler
from .errors import RequestError


class JobStream:
    """A request's scheduler jobs (one per prompt, each with n choices) seen from the event loop:
    their updates arrive on one asyncio queue, choices numbered across the jobs in prompt order."""

    def __init__(self, scheduler: Scheduler, jobs: list[Job]):
        loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue = asyncio.Queue()
        self.scheduler, self.jobs, self.open = scheduler, jobs, len(jobs)
        self.usage = Usage(0, 0, 0, None, None)
        for offset, job in enumerate(jobs):
            job.sink = lambda update, base=offset * job.n: loop.call_soon_threadsafe(
                self.queue.put_nowait, dataclasses.replace(update, choice=base + update.choice))
        try:
            for job in jobs:
                scheduler.submit(job)
        except QueueFull as exc:
            self.close()
            raise RequestError(str(exc), 503, type="server_error", code="overloaded",
                               headers={"Retry-After": "1"}) from None
        except PyllmError as exc:
            self.close()
            raise RequestError(str(exc)) from None

    async def updates(self):
        """Every update, until each job's final one (an error ends the stream at once)."""
        while self.open:
            update = await self.queue.get()
            if update.final:
                self.open -= 1
                self._add_usage(update.usage)
            if update.error:
                self.open = 0
            yield update

    def _add_usage(self, usage: Usage | None):
        if usage is not None:
            first = self.usage.prompt_tokens == 0
            self.usage = Usage(self.usage.prompt_tokens + usage.prompt_tokens,
                               self.usage.cached_tokens + usage.cached_tokens,
                               self.usage.completion_tokens + usage.completion_tokens,
                               usage.ttft_s if first else self.usage.ttft_s, usage.tpot_s if first else self.usage.tpot_s)

    def close(self):
        for job in self.jobs:
            self.scheduler.cancel(job)
