"""The HTTP API fuzzed from its own OpenAPI document (schemathesis): every route, bodies that fit
the schemas and bodies that do not, plus raw bytes that are not JSON at all.

Pass: no 5xx but the 503s the design has (not ready, busy, shutting down); every error in the
error shape the document gives its route; afterwards the server is still ready and no slot is
held (admission idle). `make test` runs a small number of cases per route;
`make fuzz` sets NUMBALM_FUZZ_EXAMPLES for >= 10,000 in all and prints the counts (and
writes them to NUMBALM_FUZZ_COUNTS as it goes).
"""

from __future__ import annotations

import atexit
import collections
import json
import os
import shutil
import tempfile

import jsonschema
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode

from server import ModelPool, create_app
from tests.server.fake_engine import FakeModel

EXAMPLES = int(os.environ.get("NUMBALM_FUZZ_EXAMPLES", "15"))
COUNTS: collections.Counter = collections.Counter()


def make_app():
    store = tempfile.mkdtemp(prefix="numbalm-fuzz-")
    atexit.register(shutil.rmtree, store, True)
    pool = ModelPool.from_models([FakeModel()], aliases={"gpt-4o-mini": "fake-model"})
    # a small token cap keeps each generated reply short; the timeout bounds any one request
    return create_app({"max_tokens_cap": 64, "request_timeout": 30,
                       "responses_store": os.path.join(store, "responses.sqlite3")}, pool=pool)


# built at import: schemathesis makes one test per operation from the document
APP = make_app()
API = schemathesis.openapi.from_wsgi("/openapi.json", APP)
API.config.generation.update(modes=[GenerationMode.POSITIVE, GenerationMode.NEGATIVE],
                             max_examples=EXAMPLES)
# the coverage phase adds every boundary value of every field (thousands of cases, slow):
# only when asked for (NUMBALM_FUZZ_COVERAGE=1)
API.config.phases.coverage.enabled = os.environ.get("NUMBALM_FUZZ_COVERAGE") == "1"
COUNTS_FILE = os.environ.get("NUMBALM_FUZZ_COUNTS")  # where a long run writes its counts


@pytest.fixture(scope="module")
def fuzz_app():
    return APP


@pytest.fixture(scope="module")
def document():
    return APP.test_client().get("/openapi.json").get_json()


def error_schema(document: dict, path: str, method: str) -> dict:
    ref = document["paths"][path][method]["responses"]["4XX"]["content"]["application/json"]
    name = ref["schema"]["$ref"].rsplit("/", 1)[-1]
    return document["components"]["schemas"][name]


def check(document, path: str, method: str, status: int, body: bytes, content_type: str):
    key = f"{method.upper()} {path}"
    COUNTS[key] += 1
    COUNTS[f"status {status}"] += 1
    if COUNTS_FILE and sum(COUNTS.values()) % 400 == 0:  # a long run's progress survives it
        with open(COUNTS_FILE, "w") as f:
            json.dump(dict(sorted(COUNTS.items())), f, indent=1)
    assert status < 500 or status == 503, f"{key}: {status} {body[:300]!r}"
    if status >= 400:
        assert content_type.startswith("application/json"), f"{key}: {content_type}"
        jsonschema.validate(json.loads(body), error_schema(document, path, method))


@API.parametrize()
@settings(deadline=None, suppress_health_check=list(HealthCheck))
def test_every_route_survives_generated_requests(case, document):
    response = case.call()
    headers = {k.lower(): v for k, v in response.headers.items()}
    content_type = headers.get("content-type", "")
    content_type = content_type[0] if isinstance(content_type, list) else content_type
    check(document, case.operation.path, case.operation.method, response.status_code,
          response.content, content_type)


POSTS = ["/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/responses",
         "/v1/messages", "/v1/messages/count_tokens", "/tokenize", "/detokenize"]


@pytest.mark.parametrize("path", POSTS)
def test_raw_bytes_are_clean_400s(fuzz_app, document, path):
    client = fuzz_app.test_client()

    @settings(max_examples=max(EXAMPLES, 10), deadline=None,
              suppress_health_check=list(HealthCheck))
    @given(body=st.one_of(st.binary(max_size=200), st.text(max_size=200).map(str.encode)),
           content_type=st.sampled_from(["application/json", "text/plain", "",
                                         "application/json; charset=latin-1"]))
    def run(body, content_type):
        r = client.post(path, data=body, content_type=content_type)
        check(document, path, "post", r.status_code, r.get_data(), r.content_type)

    run()


def test_after_fuzzing_the_server_is_ready_and_idle(fuzz_app):
    rt = fuzz_app.extensions["numbalm"]
    assert fuzz_app.test_client().get("/readyz").status_code == 200
    assert rt.admission.wait_idle(5.0)  # every slot came back
    assert rt.admission.active == 0 and rt.admission.waiting == 0
    total = sum(v for k, v in COUNTS.items() if not k.startswith("status"))
    print(f"\nfuzzed {total} requests:", dict(sorted(COUNTS.items())))
    if COUNTS_FILE:
        with open(COUNTS_FILE, "w") as f:
            json.dump({"total": total, "done": True, **dict(sorted(COUNTS.items()))}, f,
                      indent=1)
    assert total > 0
