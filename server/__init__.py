"""numbalm's OpenAI-compatible HTTP server: `create_app(config)` builds the Flask app.

    app = create_app({"models": ["smollm2-135m-instruct"]})       # loads in the background
    app = create_app(pool=ModelPool.from_models([my_model]))      # tests: inject a model

The engine is reached only through `app.extensions["numbalm"]` (a `Runtime` holding the
`ModelPool`, the admission queue and the metrics).
"""

from __future__ import annotations

from collections.abc import Mapping

from flask import Flask

from server import api, embeddings, errors, hooks, ops
from server.config import ServerConfig, build_config
from server.models import ModelPool
from server.runtime import Runtime


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
        pool = ModelPool(config.models, config.aliases, config.backend, config.warmup)
        if load:
            pool.start()
    elif config.aliases:
        pool.aliases.update(config.aliases)
    app.extensions["numbalm"] = Runtime(config, pool)
    errors.init_app(app)
    hooks.init_app(app)
    app.register_blueprint(api.bp)
    app.register_blueprint(ops.bp)
    embeddings.init_app(app)
    return app


__all__ = ["ModelPool", "ServerConfig", "create_app"]
