"""numbalm's OpenAI-compatible HTTP server: `create_app(config)` builds the Flask app.

    app = create_app({"models": ["smollm2-135m-instruct"]})       # loads in the background
    app = create_app(pool=ModelPool.from_models([my_llm]))         # tests: inject a model

The parts, one folder each:
- `server/http/`: the app's plumbing, whatever the protocol: errors in OpenAI's shape, request
  ids, API keys, CORS, access logs, server-sent events, the health routes, waitress;
- `server/serving/`: what runs a request: settings, the model pool, the admission queue,
  generation, the structured-output grammar and tool-call parsing, metrics (`Runtime` holds
  them all);
- `server/openai/`: OpenAI's wire format: request parsing, response shapes and the `/v1` routes;
- `server/anthropic/`: Anthropic's Messages API (`/v1/messages`), its own error shape;
- `server/llamacpp/`: llama-server's `/tokenize` and `/detokenize`;
- `server/ollama/`: Ollama's native API (`/api/chat`, `/api/generate`, ...) on the same serving;
- `server/cli/`: the `numbalm` command line, a client of the engine and of this app.

The engine is reached only through `app.extensions["numbalm"]` (the `Runtime`), whose pool
holds `engine.LLM`s (or test doubles with the same surface, `engine.api.LanguageModel`).
"""

from __future__ import annotations

from collections.abc import Mapping

from flask import Flask

from engine.chat import read_template
from server.anthropic import routes as anthropic
from server.http import errors, hooks, openapi, ops
from server.llamacpp import routes as llamacpp
from server.ollama import routes as ollama
from server.openai import embeddings, responses, routes
from server.serving.config import ServerConfig, build_config
from server.serving.pool import ModelPool
from server.serving.runtime import Runtime
from server.trace import routes as trace_routes
from server.ui import bp as ui_bp

BLUEPRINTS = (ops.bp, openapi.bp, routes.bp, responses.bp, embeddings.bp, llamacpp.bp,
              anthropic.bp, ollama.bp, trace_routes.bp, ui_bp)


def create_app(config: ServerConfig | Mapping | None = None, *, pool: ModelPool | None = None,
               load: bool = True) -> Flask:
    """The Flask app. `config` is a ServerConfig or a dict of its fields (defaults for the
    rest; the environment is not read here). Without `pool`, the configured models are loaded
    in a background thread when `load` is true; /readyz answers 503 until they are ready."""
    if not isinstance(config, ServerConfig):
        config = build_config(dict(config or {}), environ={})
    app = Flask(__name__)
    app.config["MAX_CONTENT_LENGTH"] = config.max_body_size
    app.json.sort_keys = False
    app.json.ensure_ascii = False
    if pool is None:
        options = {"kv_cache_mb": config.kv_cache_mb, "step_tokens": config.step_tokens}
        if config.chat_template:  # a file that cannot be used is an error before loading
            options["chat_template"] = read_template(config.chat_template)
        pool = ModelPool(config.models, config.aliases, config.backend, config.warmup,
                         engine_options=options)
        if load:
            pool.start()
    elif config.aliases:
        pool.aliases.update(config.aliases)
    app.extensions["numbalm"] = Runtime(config, pool)
    errors.init_app(app)
    hooks.init_app(app)
    for bp in BLUEPRINTS:
        app.register_blueprint(bp)
    return app


__all__ = ["ModelPool", "ServerConfig", "create_app"]
