"""RayEngine: the app's engine as N EngineReplica deployments on Ray Serve, routed by PrefixRouter.

`pyllm serve --replicas N` runs the HTTP app in its own process (the one OpenAI ingress: same API,
same page) over this engine. Each replica is a Serve deployment of one replica (so the router, not
Serve, picks which engine a request goes to); Serve restarts a replica whose process dies. A
request's jobs go to one replica, whose updates stream back through a Serve streaming call; a
client that goes away cancels that call, which cancels the jobs. A replica lost mid-stream ends its
streams with an error event, is routed around until Serve has it back, then starts over with an
empty prefix memory.
"""

import asyncio
import logging

from ray.exceptions import ActorUnavailableError, RayActorError, RayError

from ..errors import first_line
from ..jobs import Job, Update
from ..kv_blocks import prompt_block_keys
from ..router import PrefixRouter
from .errors import RequestError
from .job_stream import UpdateStream
from .metrics import summed_stats
from .ray_replica import job_to_wire

log = logging.getLogger("pyllm.ray")
INFO_TIMEOUT_S = 2.0   # /metrics and /replicas skip a replica that does not answer by then
REPLICA_LOST = (RayActorError, ActorUnavailableError)  # the replica's process is gone or unreachable


class ReplicaStream(UpdateStream):
    """A request's jobs on one replica: a Serve streaming call's batches of updates."""

    def __init__(self, engine: "RayEngine", replica: int, n_jobs: int, call):
        super().__init__(n_jobs)
        self.engine, self.replica, self.call, self.closed = engine, replica, call, False

    async def _received(self):
        """The call's batches; whatever ends it before every job's final update (the replica's
        process dying, an error in it) ends the stream with an error event, not a hang."""
        try:
            async for batch in self.call:
                yield batch
            failure = "its stream ended early"
        except Exception as exc:
            if isinstance(exc, REPLICA_LOST):
                self.engine.replica_lost(self.replica)
            log.warning("replica %d: %s", self.replica, first_line(exc))
            failure = type(exc).__name__
        yield [Update(finish_reason="error", error=f"engine replica {self.replica} failed: {failure}", final=True)]

    def batches(self):
        return self.counted(self._received())

    def close(self):
        if not self.closed:
            self.closed = True
            self.call.cancel()
            self.engine.router.finished(self.replica)


class RayEngine:
    def __init__(self, handles: list):
        self.handles = handles
        self.router = PrefixRouter(len(handles))
        self.returning: dict[int, asyncio.Task] = {}  # replica -> the task waiting for Serve to bring it back

    def start(self):
        """The replicas are running before the app starts (deploy)."""

    def stop(self):
        """The replicas' lifetime is the Ray session's (ray_session)."""

    def shutdown(self, grace_s: float):
        for handle in self.handles:
            handle.end_streams.remote(grace_s)

    async def open(self, jobs: list[Job]) -> ReplicaStream:
        """Send a request's jobs to the replica the router picks; a replica found gone before it
        accepted them is routed around once."""
        keys = prompt_block_keys(jobs[0].prompt_ids, jobs[0].salt)
        wire = [job_to_wire(job) for job in jobs]
        for attempt in (1, 2):
            replica = self.router.pick(keys)
            self.router.started(replica, keys)
            stream = ReplicaStream(self, replica, len(jobs), self.handles[replica].options(stream=True)
                                   .generate.remote(wire))
            try:
                refusal = await stream.call.__anext__()
            except REPLICA_LOST:
                stream.close()
                self.replica_lost(replica)
                if attempt == 2:
                    raise RequestError.overloaded("no engine replica is available") from None
                continue
            except BaseException:
                stream.close()
                raise
            if refusal is not None:
                stream.close()
                raise refusal
            return stream

    def replica_lost(self, replica: int):
        self.router.down(replica)
        if replica not in self.returning:
            self.returning[replica] = asyncio.get_running_loop().create_task(self._wait_back(replica))

    async def _wait_back(self, replica: int):
        """Serve restarts a lost replica; once the new one answers, it is routed to again."""
        while True:
            try:
                await self.handles[replica].info.remote()
                break
            except REPLICA_LOST:
                await asyncio.sleep(0.5)
        self.router.back(replica)
        del self.returning[replica]
        log.warning("replica %d is back", replica)

    async def _ask_all(self, method: str) -> list:
        """Each replica's answer to method, or None where it is down or does not answer in time."""
        async def ask(replica):
            if not self.router.up[replica]:
                return None
            try:
                return await asyncio.wait_for(getattr(self.handles[replica], method).remote(), INFO_TIMEOUT_S)
            except (asyncio.TimeoutError, RayError):
                return None
        return await asyncio.gather(*(ask(r) for r in range(len(self.handles))))

    async def stats(self) -> dict:
        return summed_stats([s for s in await self._ask_all("stats") if s is not None])

    async def replicas(self) -> list[dict]:
        return [{"replica": r, "up": info is not None, **(info or {}), "in_flight": self.router.in_flight[r]}
                for r, info in enumerate(await self._ask_all("info"))]
