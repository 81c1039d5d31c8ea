"""pyllm serve: the OpenAI-compatible HTTP API with SSE streaming, /metrics, /tokenize, /detokenize,
/tokenizer_info, /replicas and the chat page, over an engine: one Scheduler in this process
(LocalEngine, whose engine thread owns the LLM) or engine replicas on Ray (ray_engine.RayEngine).

The app needs only the model's Frontend (tokenizer, grammars); the engine hands each request's
updates to the event loop. A client that goes away cancels its jobs, which leave the batch before
the next step. On shutdown the engine first ends streams in flight (after a grace period) so they
close cleanly.
"""

import asyncio
import hashlib
import hmac
import json
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import Depends, FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse, StreamingResponse
from starlette.exceptions import HTTPException

from ..errors import PyllmError
from ..jobs import Job
from .body import read_json
from .errors import RequestError
from .job_stream import UpdateStream
from .logprobs import LogprobsShaper
from .metrics import Metrics
from .protocol import parse_chat, parse_completion, parse_detokenize, parse_tokenize
from .responses import ChoiceResult, Echo, Shaper
from .tools import messages_for_template

STATIC = Path(__file__).parent / "static"
MAX_BODY_BYTES = 4 << 20


async def wait_for_disconnect(request: Request):
    while (await request.receive())["type"] != "http.disconnect":
        pass


def sse(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False, separators=(',', ':'))}\n\n"


def error_json(status: int, message: str, type="invalid_request_error", headers=None) -> JSONResponse:
    return JSONResponse(RequestError(message, status, type=type).body(), status, headers=headers)


PREFIX_CACHE_SCOPES = ("global", "key")


def create_app(llm, engine, model_id: str, api_key: str | None = None,
               cors_origin: str | None = None, max_body_bytes: int = MAX_BODY_BYTES,
               prefix_cache_scope: str | None = None) -> FastAPI:
    """llm: the model's Frontend (an LLM is one); engine: a LocalEngine or a RayEngine.
    prefix_cache_scope: "key" (the default with an API key): requests share KV blocks only with
    requests of the same key, so no one can time another tenant's prompts; "global": all share."""
    scope = prefix_cache_scope or ("key" if api_key else "global")
    if scope not in PREFIX_CACHE_SCOPES:
        raise PyllmError(f"unknown prefix cache scope {scope!r}; choose from: {', '.join(PREFIX_CACHE_SCOPES)}")
    metrics = Metrics()
    context, vocab_size, tokenizer = llm.config.max_position_embeddings, llm.config.vocab_size, llm.tokenizer

    @asynccontextmanager
    async def lifespan(app):
        engine.start()
        await asyncio.to_thread(llm.grammars.llg_tokenizer)  # built once, for grammars and logprobs' bytes
        yield
        engine.stop()

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

    def cache_salt(request: Request, salt: str) -> str:
        """What a request's KV blocks are keyed with beside their tokens: its cache_salt, and under
        the "key" scope the API key it came with."""
        key = request.headers.get("authorization", "") if scope == "key" else ""
        return f"{hashlib.sha256(key.encode()).hexdigest() if key else ''}:{salt}"

    def check_model(name):
        if name is not None and name != model_id:
            raise RequestError(f"the model {name!r} does not exist; this server serves {model_id!r}", 404,
                               param="model", code="model_not_found")

    def prompt_ids(messages, prompt, tool_choice=None, add_special_tokens=True) -> list[int]:
        """Chat messages through the template, a text prompt through the tokenizer, or token ids as
        they are (no BOS added)."""
        try:
            if messages is not None:
                renders = tokenizer.template_renders_tools
                return tokenizer.encode_chat(messages_for_template(messages, tool_choice, renders),
                                             tools=tool_choice.template_tools if tool_choice and renders else None)
            if isinstance(prompt, str) and not add_special_tokens:
                prompt = tokenizer.encode(prompt, add_special_tokens=False)
            return llm.encode_prompt(prompt)
        except PyllmError as exc:
            raise RequestError(str(exc), param="messages" if messages is not None else "prompt") from None

    async def constraint_for(req):
        """The grammar a request's output must follow, compiled off the event loop; None: free text."""
        forced = req.tool_choice is not None and req.tool_choice.forced
        schema = req.tool_choice.call_schema() if forced else req.response_schema
        if schema is None:
            return None
        try:
            return await asyncio.to_thread(llm.grammars.json_schema, schema)
        except PyllmError as exc:
            raise RequestError(str(exc), param="tools" if forced else "response_format") from None

    async def generate(request: Request, chat: bool):
        body = await read_json(request, max_body_bytes)
        req = parse_chat(body) if chat else parse_completion(body)
        check_model(req.model)
        prompts = [prompt_ids(req.messages, None, req.tool_choice)] if chat else \
            [prompt_ids(None, p) for p in req.prompts]
        params = [req.sampling_params(len(ids), context, vocab_size) for ids in prompts]
        constraint = await constraint_for(req)
        echoes = [Echo(p if isinstance(p, str) else tokenizer.decode(p, skip_special_tokens=False), ids)
                  for p, ids in zip(req.prompts, prompts)] if req.echo else None
        salt = cache_salt(request, req.cache_salt)
        stream = await engine.open([Job(ids, p, None, salt=salt, n=req.n, constraint=constraint)
                                    for ids, p in zip(prompts, params)])
        shaper = Shaper(chat, model_id, req.include_usage,
                        LogprobsShaper(tokenizer, llm.grammars) if req.logprobs is not None else None,
                        req.tool_choice, [e for e in echoes for _ in range(req.n)] if echoes else None)
        n_choices = len(prompts) * req.n
        replica = {} if stream.replica is None else {"X-Pyllm-Replica": str(stream.replica)}
        if req.stream:
            return StreamingResponse(stream_events(request.url.path, stream, shaper, n_choices),
                                     media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no", **replica})
        response = await whole_response(request, stream, shaper, n_choices)
        if replica and isinstance(response, dict):
            response = JSONResponse(response, headers=replica)
        return response

    async def stream_events(path: str, stream: UpdateStream, shaper: Shaper, n_choices: int):
        status, results = 499, [ChoiceResult() for _ in range(n_choices)]  # 499: the client went away first
        try:
            for chunk in shaper.first_chunks(n_choices):
                yield sse(chunk)
            async for update in stream.updates():
                if update.error:
                    status = 500
                    yield sse(RequestError(update.error, 500, type="server_error").body())
                    break
                results[update.choice].add(update)
                for chunk in shaper.chunks(update, results[update.choice]):
                    yield sse(chunk)
            else:
                status = 200
                if shaper.include_usage:
                    yield sse(shaper.usage_chunk(stream.usage))
            yield "data: [DONE]\n\n"
        finally:
            stream.close()
            metrics.request_done(path, status, stream.usage if status == 200 else None)

    async def whole_response(request: Request, stream: UpdateStream, shaper: Shaper, n_choices: int):
        async def collect():
            results = [ChoiceResult() for _ in range(n_choices)]
            async for update in stream.updates():
                if update.error:
                    return update.error
                results[update.choice].add(update)
            return results

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
        if isinstance(result.result(), str):
            raise RequestError(result.result(), 500, type="server_error")
        metrics.request_done(request.url.path, 200, stream.usage)
        return shaper.whole(result.result(), stream.usage)

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
        model, messages, prompt, add_special_tokens = parse_tokenize(await read_json(request, max_body_bytes))
        check_model(model)
        ids = prompt_ids(messages, prompt, add_special_tokens=add_special_tokens)
        return {"tokens": ids, "count": len(ids), "max_model_len": context}

    @app.post("/detokenize", dependencies=keyed)
    async def detokenize(request: Request):
        ids = parse_detokenize(await read_json(request, max_body_bytes))
        if any(t >= vocab_size for t in ids):
            raise RequestError(f"token id out of range: the vocabulary has {vocab_size} tokens", param="tokens")
        return {"prompt": tokenizer.decode(ids, skip_special_tokens=False)}

    @app.get("/tokenizer_info", dependencies=keyed)
    async def tokenizer_info():
        return {"eos_token": tokenizer.eos_token or None, "bos_token": tokenizer.bos_token or None,
                "pad_token": tokenizer.pad_token or None, "chat_template": tokenizer.chat_template_source,
                "model_max_length": context, "vocab_size": vocab_size}

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics_text():
        return PlainTextResponse(metrics.render(await engine.stats()), media_type="text/plain; version=0.0.4")

    @app.get("/replicas")
    async def replicas():
        """Each engine replica: whether it is up, its process id and resident memory, its load."""
        return {"replicas": await engine.replicas()}

    @app.get("/")
    async def page():
        return FileResponse(STATIC / "index.html", media_type="text/html")

    return app
