"""`numbalm inspect`: the logit-lens table on a terminal, and the whole trace as JSON."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys

from server.cli.trace import print_lens, show

PROMPT = "The capital of France is"


def numbalm(*args, timeout=600):
    return subprocess.run([sys.executable, "-m", "server.cli", *args], capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, "NO_COLOR": "1"})


def test_the_table_shows_paris_on_top_after_the_last_layer(smollm2_path):
    r = numbalm("inspect", "-m", "smollm2", PROMPT)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert "30 layers, 5 positions" in lines[0]
    assert lines[1].split() == ["The", "·capital", "·of", "·France", "·is"]
    assert lines[2].split()[-1] == "·Paris"  # the token that came next (here: the model's)
    last = next(line for line in lines if line.startswith("layer 29"))
    assert last.split()[-2:] == ["·Paris", "0.77"]
    assert "\x1b[" not in r.stdout  # not a terminal: no colour


def test_json_generate_and_interventions(smollm2_path):
    r = numbalm("inspect", "-m", "smollm2", PROMPT, "--json", "--generate", "2",
                "--ablate-head", "4:3", "--top-k", "3")
    assert r.returncode == 0, r.stderr
    js = json.loads(r.stdout)
    assert [t["generated"] for t in js["tokens"]] == [False] * 5 + [True] * 2
    assert js["tokens"][5]["text"] == " Paris"
    assert len(js["logit_lens"]["top_ids"]) == js["n_layers"] == 30
    assert len(js["attention"]["weights"]) == 30
    assert js["intervention"]["ablate_heads"] == [[4, 3]]


def test_a_bad_option_is_one_line(smollm2_path):
    r = numbalm("inspect", "-m", "smollm2", PROMPT, "--ablate-head", "99:0")
    assert r.returncode == 1
    assert r.stderr.startswith("numbalm: error:") and "ablate_heads" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_colour_marks_the_guesses_that_came_true(smollm2_fast):
    tr = smollm2_fast.trace(PROMPT, attention=False)
    out = io.StringIO()
    print_lens(tr, color=True, width=80, out=out)
    text = out.getvalue()
    # green (bright on dark cells, dark on light ones): the layer's guess is the next token
    assert "\x1b[1;38;5;46;" in text and "\x1b[1;38;5;22;" in text
    assert "(the last 5 positions" not in text and "· capital" not in text
    narrow = io.StringIO()
    print_lens(tr, color=False, width=40, out=narrow)
    assert "the last 2 positions" in narrow.getvalue()


def test_pieces_are_shown_safely():
    assert show(" a\nb", 10) == "·a\\nb"
    assert show("\x07", 10) == "\\x07"
    assert show("abcdefghij", 5) == "abcd…"
