"""`numbalm serve` with the fake model, for the shutdown tests:
`python -m tests.server.fake_serve PORT DELAY GRACE` (from the repository root)."""

import sys

from server import ModelPool, create_app
from server.http.logs import setup_logging
from server.http.wsgi import GracefulServer
from server.serving.config import ServerConfig
from tests.server.fake_engine import FakeModel

if __name__ == "__main__":
    port, delay, grace = int(sys.argv[1]), float(sys.argv[2]), float(sys.argv[3])
    config = ServerConfig(port=port, shutdown_grace=grace)
    setup_logging("info", "json")
    app = create_app(config, pool=ModelPool.from_models([FakeModel(delay=delay)]))
    sys.exit(GracefulServer(app, config).run())
