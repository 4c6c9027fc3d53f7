"""`numbalm serve` with the fake model, for the shutdown tests: fake_serve.py PORT DELAY GRACE."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from fake_engine import FakeModel  # noqa: E402

from server import ModelPool, create_app  # noqa: E402
from server.http.logs import setup_logging  # noqa: E402
from server.http.wsgi import GracefulServer  # noqa: E402
from server.serving.config import ServerConfig  # noqa: E402

if __name__ == "__main__":
    port, delay, grace = int(sys.argv[1]), float(sys.argv[2]), float(sys.argv[3])
    config = ServerConfig(port=port, shutdown_grace=grace)
    setup_logging("info", "json")
    app = create_app(config, pool=ModelPool.from_models([FakeModel(delay=delay)]))
    sys.exit(GracefulServer(app, config).run())
