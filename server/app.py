"""The FastAPI application: state built in the lifespan, thin routes, one error envelope."""

import asyncio
from contextlib import asynccontextmanager
from importlib import metadata
import logging

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from engine import LLMEngine, host
from server.async_engine import AsyncEngine
from server.chat import apply_chat_template, create_chat_completion, template_options
from server.completions import create_completion
from server.engine_core import EngineInfo, EngineThread
from server.engine_process import EngineProcess
from server.errors import BadRequestError, ServiceUnavailableError, install_error_handlers
from server.memory import release_periodically
from server.metrics import EngineMetrics
from server.middleware import RequestGate
from server.protocol import DetokenizeRequest, ModelCard, ModelList, TokenizeRequest
from server.serving import ClientDisconnected, ServerSettings, ServingState, seconds

logger = logging.getLogger(__name__)


def build_serving(llm_engine: LLMEngine | EngineProcess, settings: ServerSettings) -> ServingState:
    from prometheus_client import disable_created_metrics
    from transformers import AutoTokenizer

    # The `_created` twin of every series only doubles the scrape (vLLM turns it off too).
    disable_created_metrics()

    tenants = settings.tenants.by_name
    tenant_names = list(tenants) if settings.tenants.is_configured else None
    tenant_slos = {name: (seconds(tenant.slo_ttft_ms), seconds(tenant.slo_tpot_ms)) for name, tenant in tenants.items()}
    runner = llm_engine if isinstance(llm_engine, EngineProcess) else EngineThread(llm_engine)
    info = runner.info
    metrics = EngineMetrics(settings.served_model_name, info.max_model_len, info.kv_bytes_per_block,
                            settings.metrics_compat, tenant_names, tenant_slos,
                            engine_pid=runner.pid if isinstance(runner, EngineProcess) else None,
                            cache_config={"block_size": str(info.block_size), "cache_dtype": info.kv_cache_dtype,
                                          "num_gpu_blocks": str(info.num_kv_blocks)})
    engine = AsyncEngine(
        runner, observer=metrics.record_step, stats_by_tenant=metrics.tenants is not None,
        max_queued_requests=settings.max_queued_requests,
        tenant_max_queued={name: t.max_queued for name, t in tenants.items() if t.max_queued is not None},
        tenant_tokens_per_minute={name: t.tokens_per_minute for name, t in tenants.items()
                                  if t.tokens_per_minute is not None},
        on_reject=metrics.record_rejection)
    tokenizer = AutoTokenizer.from_pretrained(info.model_path)
    if settings.chat_template is not None:
        tokenizer.chat_template = settings.chat_template
    return ServingState(settings, info, engine, metrics, tokenizer)


def build_app(llm_engine: LLMEngine | EngineProcess, settings: ServerSettings) -> FastAPI:
    """The app, with the engine loop on a thread here (an LLMEngine) or in its own process."""
    serving = build_serving(llm_engine, settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        serving.engine.start()
        releasing = asyncio.create_task(release_periodically())
        logger.info("serving %s as %r", serving.info.model_path, settings.served_model_name)
        yield
        releasing.cancel()
        await asyncio.to_thread(serving.engine.stop)
        serving.tokenizer_thread.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="iterserve", version=_version(), lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.serving = serving
    app.add_middleware(RequestGate, serving=serving)
    install_error_handlers(app)

    @app.exception_handler(ClientDisconnected)
    async def _gone(_: Request, __: ClientDisconnected) -> Response:
        return Response(status_code=499)  # nobody reads it; nginx's "client closed request"

    app.post("/v1/completions")(create_completion)
    app.post("/v1/chat/completions")(create_chat_completion)
    app.get("/v1/models")(list_models)
    app.get("/health")(health)
    app.get("/metrics")(metrics_endpoint)
    app.get("/version")(version)
    app.post("/tokenize")(tokenize)
    app.post("/detokenize")(detokenize)
    return app


async def list_models(request: Request) -> JSONResponse:
    serving: ServingState = request.app.state.serving
    card = ModelCard(id=serving.model_name, root=serving.info.model_path,
                     max_model_len=serving.max_model_len)
    return JSONResponse(ModelList(data=[card]).model_dump())


async def health(request: Request) -> Response:
    serving: ServingState = request.app.state.serving
    if not serving.engine.is_healthy:
        return ServiceUnavailableError("the engine is not running", code="engine_dead").response()
    if serving.engine.draining:
        return ServiceUnavailableError("the server is shutting down", code="draining").response()
    return Response(status_code=200)


async def metrics_endpoint(request: Request) -> Response:
    body, content_type = request.app.state.serving.metrics.exposition()
    return Response(body, media_type=content_type)


async def version(request: Request) -> JSONResponse:
    # vLLM answers {"version"}; the rest says which kernels this host got, for operators.
    info: EngineInfo = request.app.state.serving.info
    return JSONResponse({"version": _version(), "device": info.device, "dtype": info.dtype, "paths": info.paths,
                         "host": host.current().summary(),
                         "kv_cache": {"block_size": info.block_size, "num_blocks": info.num_kv_blocks,
                                      "bytes_per_block": info.kv_bytes_per_block, "dtype": info.kv_cache_dtype}})


async def tokenize(body: TokenizeRequest, request: Request) -> JSONResponse:
    serving: ServingState = request.app.state.serving
    serving.check_model(body.model)
    if (body.prompt is None) == (body.messages is None):
        raise BadRequestError("give exactly one of prompt and messages", param="prompt")
    if body.messages is not None:
        tokens = await serving.run_tokenizer(apply_chat_template, serving, body.messages, template_options(body))
    else:
        tokens = await serving.run_tokenizer(serving.tokenizer.encode, body.prompt,
                                             add_special_tokens=body.add_special_tokens)
    return JSONResponse({"count": len(tokens), "max_model_len": serving.max_model_len, "tokens": tokens})


async def detokenize(body: DetokenizeRequest, request: Request) -> JSONResponse:
    serving: ServingState = request.app.state.serving
    serving.check_model(body.model)
    vocab_size = serving.info.vocab_size
    if any(token < 0 or token >= vocab_size for token in body.tokens):
        raise BadRequestError(f"token ids must be in [0, {vocab_size})", param="tokens")
    return JSONResponse({"prompt": await serving.run_tokenizer(serving.tokenizer.decode, body.tokens)})


def _version() -> str:
    try:
        return metadata.version("iterserve")
    except metadata.PackageNotFoundError:
        return "0.1.0+local"
