"""pyllm serve: the OpenAI-compatible HTTP API with SSE streaming, /metrics, /tokenize and the chat
page, over one Scheduler whose engine thread owns the LLM.

The engine thread hands updates to the event loop with call_soon_threadsafe, into one asyncio queue
per request. A client that goes away cancels its job, which leaves the batch before the next step.
On shutdown the scheduler first ends streams in flight (after a grace period) so they close cleanly.
"""

import asyncio
import hmac
import json
from contextlib import asynccontextmanager
from pathlib import Path

import uvicorn
from fastapi import Depends, FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse, StreamingResponse
from starlette.exceptions import HTTPException

from ..errors import PyllmError
from ..scheduler import KV_MEMORY_GB, MAX_QUEUE, MAX_RUNNING, REUSE_MEMORY_MB, Job, QueueFull, Scheduler
from .metrics import Metrics
from .protocol import RequestError, Shaper, parse_chat, parse_completion, parse_tokenize

STATIC = Path(__file__).parent / "static"
MAX_BODY_BYTES = 4 << 20
SHUTDOWN_GRACE_S = 5.0


class JobStream:
    """A scheduler job seen from the event loop: its updates arrive on an asyncio queue."""

    def __init__(self, scheduler: Scheduler, prompt_ids, params, reuse: bool):
        loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue = asyncio.Queue()
        self.scheduler, self.done = scheduler, False
        self.job = Job(prompt_ids, params, lambda update: loop.call_soon_threadsafe(self.queue.put_nowait, update),
                       reuse)
        try:
            scheduler.submit(self.job)
        except QueueFull as exc:
            raise RequestError(str(exc), 503, type="server_error", code="overloaded",
                               headers={"Retry-After": "1"}) from None
        except PyllmError as exc:
            raise RequestError(str(exc)) from None

    async def updates(self):
        while not self.done:
            update = await self.queue.get()
            self.done = update.finish_reason is not None
            yield update

    def close(self):
        if not self.done:
            self.scheduler.cancel(self.job)


async def read_json(request: Request, limit: int):
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise RequestError(f"request body of {declared} bytes is over the limit of {limit}", 413)
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise RequestError(f"request body is over the limit of {limit} bytes", 413)
    try:
        return json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise RequestError(f"malformed JSON body: {exc}") from None


async def wait_for_disconnect(request: Request):
    while (await request.receive())["type"] != "http.disconnect":
        pass


def sse(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False, separators=(',', ':'))}\n\n"


def error_json(status: int, message: str, type="invalid_request_error", headers=None) -> JSONResponse:
    return JSONResponse(RequestError(message, status, type=type).body(), status, headers=headers)


def create_app(llm, scheduler: Scheduler, model_id: str, api_key: str | None = None,
               cors_origin: str | None = None, max_body_bytes: int = MAX_BODY_BYTES) -> FastAPI:
    metrics = Metrics()
    context = llm.config.max_position_embeddings

    @asynccontextmanager
    async def lifespan(app):
        scheduler.start()
        yield
        scheduler.stop()

    app = FastAPI(title="pyllm", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    if cors_origin:
        app.add_middleware(CORSMiddleware, allow_origins=[cors_origin], allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type"])

    @app.exception_handler(RequestError)
    async def request_error(request: Request, exc: RequestError):
        metrics.request_done(request.url.path, exc.status)
        return JSONResponse(exc.body(), exc.status, headers=exc.headers)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException):
        message = "not found" if exc.status_code == 404 else str(exc.detail).lower()
        return error_json(exc.status_code, f"{message}: {request.method} {request.url.path}", headers=exc.headers)

    @app.exception_handler(Exception)
    async def server_error(request: Request, exc: Exception):
        metrics.request_done(request.url.path, 500)
        return error_json(500, "internal server error", type="server_error")

    def check_key(request: Request):
        if api_key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), api_key.encode()):
            raise RequestError("missing or invalid API key (send Authorization: Bearer KEY)", 401,
                               code="invalid_api_key")

    def check_model(name):
        if name is not None and name != model_id:
            raise RequestError(f"the model {name!r} does not exist; this server serves {model_id!r}", 404,
                               param="model", code="model_not_found")

    def prompt_ids(messages, prompt) -> list[int]:
        try:
            return llm.tokenizer.encode_chat(messages) if messages is not None else llm.encode_prompt(prompt)
        except PyllmError as exc:
            raise RequestError(str(exc), param="messages" if messages is not None else "prompt") from None

    async def generate(request: Request, chat: bool):
        body = await read_json(request, max_body_bytes)
        req = parse_chat(body) if chat else parse_completion(body)
        check_model(req.model)
        ids = prompt_ids(req.messages, req.prompt)
        stream = JobStream(scheduler, ids, req.sampling_params(len(ids), context), reuse=chat)
        shaper = Shaper(chat, model_id, req.include_usage)
        if req.stream:
            return StreamingResponse(stream_events(request.url.path, stream, shaper), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        return await whole_response(request, stream, shaper)

    async def stream_events(path: str, stream: JobStream, shaper: Shaper):
        status, usage = 499, None  # 499: the client went away first
        try:
            if shaper.chat:
                yield sse(shaper.chunk(first=True))
            async for update in stream.updates():
                if update.error:
                    status = 500
                    yield sse(RequestError(update.error, 500, type="server_error").body())
                    break
                if update.text:
                    yield sse(shaper.chunk(update.text))
                if update.finish_reason:
                    status, usage = 200, update.usage
                    yield sse(shaper.chunk(finish_reason=update.finish_reason))
            if usage is not None and shaper.include_usage:
                yield sse(shaper.usage_chunk(usage))
            yield "data: [DONE]\n\n"
        finally:
            stream.close()
            metrics.request_done(path, status, usage)

    async def whole_response(request: Request, stream: JobStream, shaper: Shaper):
        async def collect():
            parts = [update async for update in stream.updates()]
            return "".join(u.text for u in parts), parts[-1]

        result, gone = asyncio.ensure_future(collect()), asyncio.ensure_future(wait_for_disconnect(request))
        try:
            await asyncio.wait({result, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
            stream.close()
        if not result.done():
            result.cancel()
            metrics.request_done(request.url.path, 499)
            return PlainTextResponse("", 499)  # nobody is listening
        text, last = result.result()
        if last.error:
            raise RequestError(last.error, 500, type="server_error")
        metrics.request_done(request.url.path, 200, last.usage)
        return shaper.whole(text, last.finish_reason, last.usage)

    keyed = [Depends(check_key)]

    @app.post("/v1/chat/completions", dependencies=keyed)
    async def chat_completions(request: Request):
        return await generate(request, chat=True)

    @app.post("/v1/completions", dependencies=keyed)
    async def completions(request: Request):
        return await generate(request, chat=False)

    @app.get("/v1/models", dependencies=keyed)
    async def models():
        return {"object": "list", "data": [{"id": model_id, "object": "model", "created": 0, "owned_by": "pyllm",
                                            "max_model_len": context}]}

    @app.post("/tokenize", dependencies=keyed)
    async def tokenize(request: Request):
        model, messages, prompt = parse_tokenize(await read_json(request, max_body_bytes))
        check_model(model)
        ids = prompt_ids(messages, prompt)
        return {"tokens": ids, "count": len(ids), "max_model_len": context}

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics_text():
        return PlainTextResponse(metrics.render(scheduler.stats()), media_type="text/plain; version=0.0.4")

    @app.get("/")
    async def page():
        return FileResponse(STATIC / "index.html", media_type="text/html")

    return app


class Server(uvicorn.Server):
    """uvicorn, but a shutdown first tells the scheduler to end the streams in flight (after a grace
    period), so every open stream gets its final chunk before connections are waited for."""

    def __init__(self, config: uvicorn.Config, scheduler: Scheduler, grace_s: float):
        super().__init__(config)
        self.scheduler, self.grace_s = scheduler, grace_s

    async def shutdown(self, sockets=None):
        self.scheduler.shutdown(self.grace_s)
        await super().shutdown(sockets)


def make_server(llm, model_id: str, host="127.0.0.1", port=8000, api_key=None, max_running=MAX_RUNNING,
                max_queue=MAX_QUEUE, kv_memory_gb=KV_MEMORY_GB, reuse_memory_mb=REUSE_MEMORY_MB, cors_origin=None,
                log_level="info", grace_s=SHUTDOWN_GRACE_S, max_body_bytes=MAX_BODY_BYTES) -> Server:
    scheduler = Scheduler(llm, max_running, max_queue, int(kv_memory_gb * 2**30),
                          reuse_budget_bytes=int(reuse_memory_mb * 2**20))
    app = create_app(llm, scheduler, model_id, api_key, cors_origin, max_body_bytes)
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=grace_s + 5)
    return Server(config, scheduler, grace_s)
