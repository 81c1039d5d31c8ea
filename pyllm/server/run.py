"""Running the app: Server (uvicorn with a graceful shutdown of the engine's streams),
make_server (one engine in this process) and serve_engine (any engine)."""

import uvicorn
from fastapi import FastAPI

from ..scheduler import KV_MEMORY_GB, MAX_QUEUE, MAX_RUNNING, Scheduler
from .app import MAX_BODY_BYTES, create_app
from .job_stream import LocalEngine

SHUTDOWN_GRACE_S = 5.0


class Server(uvicorn.Server):
    """uvicorn, but a shutdown first tells the engine to end the streams in flight (after a grace
    period), so every open stream gets its final chunk before connections are waited for."""

    def __init__(self, app: FastAPI, engine, host: str, port: int, log_level: str, grace_s: float):
        super().__init__(uvicorn.Config(app, host=host, port=port, log_level=log_level,
                                        timeout_graceful_shutdown=grace_s + 5))
        self.engine, self.grace_s = engine, grace_s

    async def shutdown(self, sockets=None):
        self.engine.shutdown(self.grace_s)
        await super().shutdown(sockets)


def local_engine(llm, max_running=MAX_RUNNING, max_queue=MAX_QUEUE, kv_memory_gb=KV_MEMORY_GB) -> LocalEngine:
    """One scheduler over llm in this process: make_server's engine, and each Ray replica's."""
    return LocalEngine(Scheduler(llm, max_running, max_queue, int(kv_memory_gb * 2**30)))


def make_server(llm, model_id: str, host="127.0.0.1", port=8000, api_key=None, max_running=MAX_RUNNING,
                max_queue=MAX_QUEUE, kv_memory_gb=KV_MEMORY_GB, prefix_cache_scope=None, cors_origin=None,
                log_level="info", grace_s=SHUTDOWN_GRACE_S, max_body_bytes=MAX_BODY_BYTES) -> Server:
    return serve_engine(llm, local_engine(llm, max_running, max_queue, kv_memory_gb), model_id, host, port, api_key,
                        prefix_cache_scope, cors_origin, log_level, grace_s, max_body_bytes)


def serve_engine(frontend, engine, model_id: str, host="127.0.0.1", port=8000, api_key=None, prefix_cache_scope=None,
                 cors_origin=None, log_level="info", grace_s=SHUTDOWN_GRACE_S, max_body_bytes=MAX_BODY_BYTES) -> Server:
    """The server over any engine (make_server's LocalEngine, or ray_engine.RayEngine)."""
    app = create_app(frontend, engine, model_id, api_key, cors_origin, max_body_bytes, prefix_cache_scope)
    return Server(app, engine, host, port, log_level, grace_s)
