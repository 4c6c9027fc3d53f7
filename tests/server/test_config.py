"""Settings: defaults < config file < NUMBALM_* environment < command line."""

from __future__ import annotations

import argparse
import json

import pytest

from engine.registry import DEFAULT_MODEL
from server.cli.serve import add_parser, config_from_args
from server.serving.config import ConfigError, ServerConfig, build_config


def parse(argv):
    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers())
    return parser.parse_args(["serve", *argv])


def test_defaults():
    c = ServerConfig()
    assert (c.host, c.port, c.max_concurrent) == ("127.0.0.1", 8080, 8)  # batched together
    assert c.worker_threads == c.max_concurrent + c.queue_size + 4


def test_precedence_file_env_cli(tmp_path):
    path = tmp_path / "numbalm.toml"
    path.write_text('port = 7000\nqueue_size = 3\napi_keys = ["from-file"]\n'
                    'aliases = { gpt = "smollm2-135m-instruct" }\n')
    env = {"NUMBALM_PORT": "7100", "NUMBALM_API_KEYS": "a,b", "NUMBALM_WARMUP": "false"}
    c = build_config({"port": 7200, "host": None}, env, path)
    assert c.port == 7200 and c.queue_size == 3 and c.api_keys == ["a", "b"]
    assert c.aliases == {"gpt": "smollm2-135m-instruct"} and c.warmup is False
    assert build_config({}, env, path).port == 7100


def test_json_config_file_through_env(tmp_path):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"max-concurrent": 2, "cors_origins": ["*"]}))
    c = build_config({}, {"NUMBALM_CONFIG": str(path)})
    assert c.max_concurrent == 2 and c.cors_origins == ["*"]


@pytest.mark.parametrize("cli, env, message", [
    ({}, {"NUMBALM_PORT": "eighty"}, "port"),
    ({"max_concurrent": 0}, {}, "max_concurrent"),
    ({"queue_timeout": -1.0}, {}, "queue_timeout"),
    ({"log_format": "xml"}, {}, "log_format"),
    ({"bogus": 1}, {}, "bogus"),
    ({}, {"NUMBALM_ALIASES": "no-equals"}, "aliases"),
])
def test_bad_settings_name_the_setting(cli, env, message):
    with pytest.raises(ConfigError, match=message):
        build_config(cli, env)


def test_bad_config_file(tmp_path):
    with pytest.raises(ConfigError, match="cannot read"):
        build_config({}, {}, tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("port = = 3")
    with pytest.raises(ConfigError, match="cannot parse"):
        build_config({}, {}, bad)


def test_serve_arguments():
    args = parse(["-m", "smollm2-135m-instruct", "-m", "g=gemma3-270m", "--alias",
                  "gpt-4o=g", "--port", "9000", "--api-key", "k1", "--api-key", "k2",
                  "--max-concurrent", "2", "--queue-size", "4", "--no-warmup", "--dev"])
    c = config_from_args(args, environ={})
    assert c.models == ["smollm2-135m-instruct", "g=gemma3-270m"]
    assert c.aliases == {"gpt-4o": "g"} and c.port == 9000 and c.api_keys == ["k1", "k2"]
    assert (c.max_concurrent, c.queue_size, c.warmup, args.dev) == (2, 4, False, True)


def test_serve_defaults_to_the_default_model_and_env():
    c = config_from_args(parse([]), environ={"NUMBALM_QUEUE_SIZE": "2"})
    assert c.models == [DEFAULT_MODEL] and c.queue_size == 2 and c.warmup is True


def test_serve_command_reports_bad_config(capsys):
    args = parse(["--port", "-3"])
    assert args.func(args) == 2
    assert "port" in capsys.readouterr().err


def test_embeddings_options_from_env_and_cli():
    env = {"NUMBALM_EMBEDDINGS_CACHE_BYTES": "0"}
    c = build_config({"embeddings_max_batch": 16}, env)
    assert (c.embeddings_max_batch, c.embeddings_cache_bytes) == (16, 0)
    with pytest.raises(ConfigError, match="embeddings_max_batch"):
        build_config({"embeddings_max_batch": 0}, {})


def test_serve_command_reports_more_compute_threads_than_cores(capsys):
    args = parse(["--compute-threads", "999"])
    assert args.func(args) == 2
    assert "threads must be 1 to" in capsys.readouterr().err
