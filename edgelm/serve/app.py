"""The ASGI app: the OpenAI-compatible endpoints over edgelm's task objects."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from edgelm.errors import EdgelmError, UsageError
from edgelm.runtime.capabilities import EmbeddingModel, TextModel, TokenIdsModel, Tokenized, can_chat
from edgelm.runtime.core.params import GenerationParams
from edgelm.serve import constrained
from edgelm.serve.errors import ApiError, from_edgelm, quoted
from edgelm.serve.http import EventStream, JobResponse, read_json, render_result
from edgelm.serve.page import page_routes
from edgelm.serve.schema import (
    GenerationRequest,
    chat_request,
    completion_request,
    detokenize_request,
    embedding_request,
    tokenize_request,
)
from edgelm.serve.security import Guard
from edgelm.serve.shapes import Shaper
from edgelm.serve.worker import Job, ModelWorker, SequenceWorker

log = logging.getLogger("edgelm.serve")
MAX_BODY_BYTES = 4 * 1024 * 1024
DEFAULT_PARALLEL = 4  # sequences per GGUF text model, as llama.cpp's server defaults to


@dataclass
class ServedModel:
    id: str
    task: Any  # what edgelm.load returned
    worker: ModelWorker | SequenceWorker
    owned: bool  # loaded by the app from a path: closed when the app shuts down
    created: int

    @property
    def can_chat(self) -> bool:
        return can_chat(self.task)

    @property
    def can_complete(self) -> bool:
        return isinstance(self.task, TextModel)

    @property
    def can_embed(self) -> bool:
        return isinstance(self.task, EmbeddingModel)

    @property
    def endpoints(self) -> list[str]:
        pairs = ((self.can_chat, "/v1/chat/completions"), (self.can_complete, "/v1/completions"),
                 (self.can_embed, "/v1/embeddings"))
        tokens = ["/tokenize", "/detokenize"] if isinstance(self.task, Tokenized) else []
        return [path for ok, path in pairs if ok] + tokens

    def describe(self) -> dict[str, Any]:
        return {"id": self.id, "object": "model", "created": self.created, "owned_by": "edgelm",
                "task": getattr(self.task, "task", None), "endpoints": self.endpoints}


def default_id(path: str | Path) -> str:
    """A model's id: its artifact folder's name (a bare .gguf file: the file's stem)."""
    path = Path(path)
    return path.stem if path.suffix == ".gguf" else path.resolve().name


class Server:
    """The served models and the endpoint functions over them."""

    def __init__(self, models: dict[str, ServedModel], max_body_bytes: int):
        self.models = models
        self.max_body_bytes = max_body_bytes

    # -- looking models up ------------------------------------------------------------------------
    def model(self, model_id: str | None, needs: str | None = None) -> ServedModel:
        if model_id is None:
            if len(self.models) != 1:
                raise ApiError(400, "'model' is required when the server serves several models", param="model",
                               code="missing_field")
            model_id = next(iter(self.models))
        served = self.models.get(model_id)
        if served is None:
            raise ApiError(404, f"model {quoted(model_id)} is not served here; GET /v1/models lists the models",
                           param="model", code="model_not_found")
        if needs and needs not in served.endpoints:
            raise ApiError(400, self._cannot(served, needs), param="model", code="unsupported_model")
        return served

    @staticmethod
    def _cannot(served: ServedModel, endpoint: str) -> str:
        if endpoint == "/v1/chat/completions" and served.can_complete:
            return f"model {quoted(served.id)} has no chat template; use /v1/completions with a plain prompt"
        task = getattr(served.task, "task", "unknown")
        offered = ", ".join(served.endpoints)
        return f"model {quoted(served.id)} is a {task} model; it serves {offered or 'nothing'} here"

    # -- endpoints -----------------------------------------------------------------------------------
    async def health(self, request: Request) -> JSONResponse:
        # a scheduled model adds its slots and the tokens their caches hold
        models = {m.id: m.worker.health() for m in self.models.values()}
        return JSONResponse({"status": "ok", "models": models})

    async def list_models(self, request: Request) -> JSONResponse:
        return JSONResponse({"object": "list", "data": [m.describe() for m in self.models.values()]})

    async def get_model(self, request: Request) -> JSONResponse:
        return JSONResponse(self.model(request.path_params["model_id"]).describe())

    async def completions(self, request: Request):
        served, req, options = await self._generation_request(request, "/v1/completions", completion_request,
                                                              constrained.completion_fields)
        return self._generation(served, req, lambda: served.task.stream(req.prompt, **req.params, **options),
                                chat=False)

    async def chat_completions(self, request: Request):
        served, req, options = await self._generation_request(request, "/v1/chat/completions", chat_request,
                                                              constrained.chat_fields)
        return self._generation(served, req, lambda: served.task.chat_stream(req.messages, **req.params, **options),
                                chat=True, tools="tools" in options)

    async def _generation_request(self, request: Request, endpoint: str, parse, fields):
        """The model, checked request and constraint options of a generation request. The model a
        body names is looked up first: the fields a body may carry depend on it."""
        body = await read_json(request, self.max_body_bytes)
        named = body.get("model")
        named = self.model(named, endpoint) if isinstance(named, str) and named else None
        req = parse(body, fields(named.task) if named else None)
        served = self.model(req.model, endpoint)
        self._check_params(served, req)
        return served, req, constrained.options(req.extra)

    async def embeddings(self, request: Request):
        req = embedding_request(await read_json(request, self.max_body_bytes))
        served = self.model(req.model, "/v1/embeddings")
        task = served.task

        def compute() -> tuple[np.ndarray, int]:
            vectors = task.embed(req.inputs)
            return vectors, _embedded_tokens(task, req.inputs, vectors)

        def shape(result: tuple[np.ndarray, int]) -> dict[str, Any]:
            vectors, tokens = result
            truncated = set(getattr(vectors, "truncated", ()))
            data = []
            for i, row in enumerate(np.asarray(vectors, np.float32)):
                value = base64.b64encode(row.astype("<f4").tobytes()).decode() if req.base64 else row.tolist()
                item = {"object": "embedding", "index": i, "embedding": value}
                if i in truncated:  # the text was cut to the model's maximum length: say so
                    item["truncated"] = True
                data.append(item)
            return {"object": "list", "data": data, "model": served.id,
                    "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}

        job = Job(_call_job(compute))
        return JobResponse(served.worker, job, lambda job, send: render_result(job, send, shape))

    async def tokenize(self, request: Request) -> JSONResponse:
        req = tokenize_request(await read_json(request, self.max_body_bytes))
        served = self.model(req.model, "/tokenize")
        tokenizer = served.task.tokenizer

        def run() -> dict[str, Any]:
            if isinstance(served.task, TextModel) and req.add_special:
                ids = served.task.encode(req.content)  # the model's own rule for BOS
            else:
                ids = tokenizer.encode(req.content, add_special_tokens=req.add_special).ids
            if not req.with_pieces:
                return {"tokens": list(ids)}
            pieces = [{"id": i, "piece": tokenizer.decode([i], skip_special_tokens=False)} for i in ids]
            return {"tokens": pieces}

        # tokenizers are read-only after loading: this runs beside the model's worker, never behind it
        return JSONResponse(await _off_loop(run))

    async def detokenize(self, request: Request) -> JSONResponse:
        req = detokenize_request(await read_json(request, self.max_body_bytes))
        served = self.model(req.model, "/detokenize")
        tokenizer = served.task.tokenizer
        size = tokenizer.get_vocab_size() if hasattr(tokenizer, "get_vocab_size") else tokenizer.vocab_size
        outside = next((t for t in req.tokens if t >= size), None)
        if outside is not None:
            raise ApiError(400, f"token id {outside} is outside the vocabulary of {size} tokens", param="tokens",
                           code="invalid_value")
        text = await _off_loop(lambda: tokenizer.decode(req.tokens, skip_special_tokens=False))
        return JSONResponse({"content": text})

    # -- generation ----------------------------------------------------------------------------------
    @staticmethod
    def _check_params(served: ServedModel, req: GenerationRequest) -> None:
        """Bad generation parameters are a 400 before anything is queued."""
        try:
            GenerationParams.from_kwargs(served.task.defaults, **req.params)
        except UsageError as err:
            raise from_edgelm(err) from None

    def _generation(self, served: ServedModel, req: GenerationRequest, start, chat: bool,
                    tools: bool = False) -> JobResponse:
        shaper = Shaper(served.id, chat, req.include_usage)
        job = Job(_generation_job(start, req.stream))
        if req.stream:
            return JobResponse(served.worker, job, lambda job, send: _render_stream(job, send, shaper, tools))
        return JobResponse(served.worker, job, lambda job, send: render_result(job, send, shaper.whole))


def _embedded_tokens(task: Any, texts: list[str], vectors: Any) -> int:
    """How many tokens the embedder saw (special tokens and truncation included), by its own rule:
    the counts it returned with the vectors, else the ids it says it runs each text as."""
    counts = getattr(vectors, "token_counts", ())
    if len(counts) == len(texts):
        return sum(counts)
    if isinstance(task, TokenIdsModel):  # GgufEmbedder: ids(text) -> (ids, truncated)
        return sum(len(task.ids(t)[0]) for t in texts)
    return sum(len(task.tokenizer.encode(t).ids) for t in texts)


async def _off_loop(fn):
    try:
        return await asyncio.to_thread(fn)
    except EdgelmError as err:
        raise from_edgelm(err) from None


def _reported(job: Job, err: BaseException) -> None:
    if isinstance(err, ApiError):
        job.emit("error", err)
    elif isinstance(err, EdgelmError):
        job.emit("error", from_edgelm(err))
    else:
        log.error("model run failed: %s: %s", type(err).__name__, err, exc_info=log.isEnabledFor(logging.DEBUG))
        job.emit("error", ApiError(500, "internal error while running the model; the server log has the details",
                                   code="internal_error"))


def _call_job(compute):
    """A job that computes one result on the worker thread."""
    def run(job: Job) -> None:
        if job.cancelled.is_set():
            return
        try:
            job.emit("done", compute())
        except Exception as err:
            _reported(job, err)
    return run


def _generation_job(start, send_pieces: bool):
    """A job that runs a TextStream on its request's thread, stopping when the client goes: the
    stream is cancelled through its own sequence (`TextStream.cancel`), which leaves the
    scheduler's queue at once or its slot before the next step.

    `start()` tokenises and checks the prompt; its errors (a prompt over the context, say) are
    reported before the answer has begun, so they keep their 400 status even when streaming.
    """
    def run(job: Job) -> None:
        try:
            completion = _drain(job, start, send_pieces)
        except Exception as err:
            _reported(job, err)
            return
        if completion is not None:
            job.emit("done", completion)
    return run


def _drain(job: Job, start, send_pieces: bool):
    """Run the stream to its end (or until the job is cancelled); its Completion, or None."""
    stream = start()
    job.on_cancel(stream.cancel)  # a disconnect now frees a scheduled sequence's slot before the next step
    job.emit("started")
    pieces = iter(stream)
    try:
        for piece in pieces:
            if send_pieces:
                job.emit("piece", piece)
            if job.cancelled.is_set():
                return None
    finally:
        close = getattr(pieces, "close", None)
        if close is not None:
            close()  # leaves the generator's loop now, not whenever it is collected
    return stream.completion


async def _render_stream(job: Job, send, shaper: Shaper, tools: bool = False) -> None:
    kind, value = await job.next_event()
    if kind == "error":
        await value.send(send)  # nothing sent yet: the error keeps its status
        return
    if kind != "started":
        return
    events = EventStream(send)
    await events.open()
    held = ToolCallHold() if tools else None
    try:
        if shaper.chat:
            await events.event(shaper.chunk(role=True))
        while True:
            kind, value = await job.next_event()
            if kind == "piece":
                text = held.feed(value) if held else value
                if text:
                    await events.event(shaper.chunk(text))
            elif kind == "done":
                if held is not None:
                    if value.tool_calls:
                        await events.event(shaper.tool_calls_chunk(value.tool_calls))
                    # a call cut short (max_tokens) is no call, and its partial JSON no content: nothing more
                await events.event(shaper.chunk(None if shaper.chat else "", finish=_finish(value)))
                if shaper.include_usage:
                    await events.event(shaper.usage_chunk(value))
                await events.event("[DONE]")
                return
            elif kind == "error":
                await events.event(value.payload())
                return
            else:
                return
    finally:
        with contextlib.suppress(OSError):
            await events.close()


def _finish(completion) -> str:
    return "tool_calls" if getattr(completion, "tool_calls", None) else completion.finish_reason


class ToolCallHold:
    """With tools, a reply whose first non-blank character is "{" is a tool call: its text is held
    back and sent as `tool_calls` once complete. Plain text streams as usual."""

    def __init__(self):
        self.text = ""  # what is held back
        self.call: bool | None = None  # None: not known yet (nothing but blanks so far)

    def feed(self, piece: str) -> str:
        """The text that may be sent now."""
        if self.call is False:
            return piece
        self.text += piece
        if self.call is None and self.text.strip():
            self.call = self.text.lstrip().startswith("{")
            if not self.call:
                out, self.text = self.text, ""
                return out
        return ""


# -- assembling the app ----------------------------------------------------------------------------
async def _http_error(request: Request, exc: HTTPException):
    status = exc.status_code
    message = {404: f"no endpoint at {quoted(request.url.path)}", 405: f"{request.method} is not allowed here"}
    error = ApiError(status, message.get(status, str(exc.detail)), code="not_found" if status == 404 else None)
    return JSONResponse(error.payload(), status_code=status, headers=exc.headers)


async def _internal_error(request: Request, exc: Exception):
    # Starlette re-raises after answering; the Guard around the app logs it once
    error = ApiError(500, "internal server error; the server log has the details", code="internal_error")
    return JSONResponse(error.payload(), status_code=500)


async def _api_error(request: Request, exc: ApiError):
    return JSONResponse(exc.payload(), status_code=exc.status, headers=exc.headers)


def _served(models: Mapping[str, Any] | Sequence[str | Path], max_queue: int, load_options: dict) -> dict:
    from edgelm.runtime import load

    if not isinstance(models, Mapping):
        models = {default_id(p): p for p in models}
    if not models:
        raise UsageError("give at least one model to serve")
    served: dict[str, ServedModel] = {}
    created = int(time.time())
    try:
        for model_id, value in models.items():
            if not isinstance(model_id, str) or not model_id or len(model_id) > 256 or not model_id.isprintable():
                raise UsageError(f"model id {quoted(model_id)} must be 1 to 256 printable characters")
            owned = isinstance(value, (str, Path))
            task = load(value, **load_options) if owned else value
            _warm_constraints(task)
            served[model_id] = ServedModel(model_id, task, _worker(model_id, task, max_queue), owned, created)
    except BaseException:
        for model in served.values():
            if model.owned:
                model.task.close()
        raise
    return served


def _worker(model_id: str, task: Any, max_queue: int) -> ModelWorker | SequenceWorker:
    """A text generator's requests are sequences of its scheduler (side by side where it has slots
    for several); an encoder's run one after another on its worker thread."""
    scheduler = getattr(task, "scheduler", None)
    if scheduler is not None:
        return SequenceWorker(model_id, max_queue, scheduler)
    return ModelWorker(model_id, max_queue)


def _warm_constraints(task: Any) -> None:
    """Build a generator's llguidance vocabulary at load (a few hundred ms for a 50k vocabulary),
    so the first request with response_format or tools does not pay for it."""
    if constrained.completion_fields(task) is None and constrained.chat_fields(task) is None:
        return
    from edgelm.runtime.core.constraint_vocab import llg_vocabulary

    try:
        llg_vocabulary(task)
    except Exception as err:  # unconstrained requests still work; a constrained one reports the error
        log.warning("constrained output unavailable for this model: %s: %s", type(err).__name__, err)


def create_app(models: Mapping[str, Any] | Sequence[str | Path], *, api_key: str | None = None,
               cors_origins: Sequence[str] = (), max_queue: int = 64, loopback_only: bool = True,
               max_body_bytes: int = MAX_BODY_BYTES, **load_options: Any):
    """The ASGI app serving `models` in OpenAI's protocol.

    `models` maps ids to task objects from `edgelm.load` (or to artifact paths, loaded here with
    `load_options` and closed at shutdown); a list of paths uses each folder's name as the id.
    `parallel` (in `load_options`) is how many sequences each GGUF text model or fused-graph GPT-2
    decodes together (its scheduler's slots); models loaded elsewhere are served as they were loaded.
    `loopback_only` refuses requests whose Host header is not a loopback name (for a server bound
    to 127.0.0.1 or ::1); `api_key` requires `Authorization: Bearer KEY` everywhere but /health and
    the chat page's files (served at "/", see page.py).
    """
    if isinstance(max_queue, bool) or not isinstance(max_queue, int) or max_queue < 0:
        raise UsageError(f"max_queue must be an integer >= 0, got {max_queue!r}")
    if api_key is not None and (not isinstance(api_key, str) or not api_key.strip()):
        raise UsageError("the API key is empty; give a non-empty key or none")
    load_options.setdefault("parallel", DEFAULT_PARALLEL)
    served = _served(models, max_queue, load_options)
    server = Server(served, max_body_bytes)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        try:
            yield
        finally:
            await asyncio.to_thread(_shut_down, served)

    routes = [
        Route("/health", server.health, methods=["GET"]),
        Route("/v1/models", server.list_models, methods=["GET"]),
        Route("/v1/models/{model_id:path}", server.get_model, methods=["GET"]),
        Route("/v1/completions", server.completions, methods=["POST"]),
        Route("/v1/chat/completions", server.chat_completions, methods=["POST"]),
        Route("/v1/embeddings", server.embeddings, methods=["POST"]),
        Route("/tokenize", server.tokenize, methods=["POST"]),
        Route("/detokenize", server.detokenize, methods=["POST"]),
        *page_routes(),  # the chat page at "/"
    ]
    handlers = {HTTPException: _http_error, ApiError: _api_error, Exception: _internal_error}
    app = Starlette(routes=routes, exception_handlers=handlers, lifespan=lifespan)
    guard = Guard(app, api_key=api_key, cors_origins=tuple(cors_origins), loopback_only=loopback_only)
    guard.models = served  # for an embedding app that wants to look at them
    return guard


def _shut_down(served: dict[str, ServedModel]) -> None:
    stopped = {model.id: model.worker.stop() for model in served.values()}
    for model in served.values():
        if not model.owned:
            continue
        if stopped[model.id]:
            model.task.close()
        else:  # closing a backend under a running decode step could crash the process
            log.warning("model %s was still busy at shutdown; left open", model.id)
