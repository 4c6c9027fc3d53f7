"""Stored responses (the Responses API's `store: true`): an SQLite file under the model cache,
so `previous_response_id` and `GET /v1/responses/{id}` survive a restart.

One row per response: the response object as returned, the input items of its request and the
whole conversation up to and including its output (what a continuation starts from), as JSON.
The store is bounded by age (`responses_max_age_days`) and size (`responses_max_mb`): each write
deletes what is too old, then the oldest rows while the total is over the limit. SQLite does
the locking; every call opens its own short connection, so any request thread may use it.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from pathlib import Path

SCHEMA = """CREATE TABLE IF NOT EXISTS responses (
    id TEXT PRIMARY KEY, created REAL NOT NULL, size INTEGER NOT NULL,
    response TEXT NOT NULL, input_items TEXT NOT NULL, conversation TEXT NOT NULL)"""


class ResponseStore:
    def __init__(self, path: str | Path, max_age_days: float = 30.0, max_mb: float = 256.0):
        self.path = Path(path)
        self.max_age = max_age_days * 86400
        self.max_bytes = int(max_mb * 1024 * 1024)
        self._ready = False
        self._lock = threading.Lock()

    def _connect(self) -> sqlite3.Connection:
        with self._lock:
            if not self._ready:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                with sqlite3.connect(self.path) as db:
                    db.execute("PRAGMA journal_mode=WAL")
                    db.execute(SCHEMA)
                self._ready = True
        return sqlite3.connect(self.path, timeout=10)

    def put(self, response: dict, input_items: list, conversation: list) -> None:
        blobs = [json.dumps(x, ensure_ascii=False) for x in (response, input_items, conversation)]
        size = sum(len(b) for b in blobs)
        now = time.time()
        with self._connect() as db:
            db.execute("INSERT OR REPLACE INTO responses VALUES (?, ?, ?, ?, ?, ?)",
                       (response["id"], now, size, *blobs))
            db.execute("DELETE FROM responses WHERE created < ?", (now - self.max_age,))
            total = db.execute("SELECT COALESCE(SUM(size), 0) FROM responses").fetchone()[0]
            while total > self.max_bytes:
                oldest = db.execute("SELECT id, size FROM responses ORDER BY created "
                                    "LIMIT 1").fetchone()
                if oldest is None:
                    break
                db.execute("DELETE FROM responses WHERE id = ?", (oldest[0],))
                total -= oldest[1]
        db.close()

    def get(self, response_id: str) -> tuple[dict, list, list] | None:
        """(response, input items, conversation), or None when unknown (or expired)."""
        with self._connect() as db:
            row = db.execute("SELECT response, input_items, conversation, created FROM "
                             "responses WHERE id = ?", (response_id,)).fetchone()
        db.close()
        if row is None or row[3] < time.time() - self.max_age:
            return None
        return json.loads(row[0]), json.loads(row[1]), json.loads(row[2])

    def delete(self, response_id: str) -> bool:
        with self._connect() as db:
            deleted = db.execute("DELETE FROM responses WHERE id = ?", (response_id,)).rowcount
        db.close()
        return deleted > 0
