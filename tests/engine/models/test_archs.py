"""Each decoder architecture against transformers, on tiny random models (tests/arch_models.py).

The GGUF files and transformers' logits and token ids are committed under tests/data/archs/
(tests/data/README.md says how they were made), so these run without torch. With
transformers installed, `test_live_*` rebuild each case and compare against it directly.

The bar (issue 21): reference backend median |d| <= 1e-3 and top-1 100 %; fast backend top-1
>= 99 % and median <= 0.02; greedy continuations of both backends identical for 32 tokens;
tokenizer ids identical to Hugging Face `tokenizers` on a fixed multilingual text set.
"""

from __future__ import annotations

import functools
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

import engine
from tests.arch_models import CASES, DATA, QUANTIZED, TEXTS

VARIANTS = ("f16", QUANTIZED)
EXPECTED_ARCH = {"llama3": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3",
                 "phi3": "phi3", "gemma2": "gemma2"}
HAVE_TRANSFORMERS = all(importlib.util.find_spec(m) for m in ("torch", "transformers",
                                                              "tokenizers"))
if HAVE_TRANSFORMERS:  # the cases are written with transformers 5's rope_parameters
    from importlib.metadata import version

    HAVE_TRANSFORMERS = int(version("transformers").split(".")[0]) >= 5


@functools.cache
def load(case: str, variant: str, backend: str):
    return engine.load_model(str(DATA / f"{case}.{variant}.gguf"), backend=backend)


@functools.cache
def golden(case: str, variant: str) -> dict:
    with np.load(DATA / f"{case}.{variant}.npz") as z:
        return {k: z[k] for k in z.files}


def agreement(got: np.ndarray, want: np.ndarray) -> tuple[float, float]:
    """(median |got - want|, share of positions whose top-1 token agrees)."""
    return float(np.median(np.abs(got - want))), float((got.argmax(1) == want.argmax(1)).mean())


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("case", CASES)
def test_reference_backend_matches_transformers(case, variant):
    g = golden(case, variant)
    llm = load(case, variant, "reference")
    assert llm.architecture == EXPECTED_ARCH[case]
    median, top1 = agreement(llm.logits(g["ids"].tolist()), g["logits"])
    assert median <= 1e-3 and top1 == 1.0, (median, top1)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("case", CASES)
def test_fast_backend_matches_transformers(case, variant):
    g = golden(case, variant)
    median, top1 = agreement(load(case, variant, "fast").logits(g["ids"].tolist()), g["logits"])
    assert median <= 0.02 and top1 >= 0.99, (median, top1)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("case", CASES)
def test_greedy_32_tokens_are_the_same_on_both_backends(case, variant):
    prompt = golden(case, variant)["ids"][:6].tolist()
    runs = []
    for backend in ("reference", "fast"):
        llm = load(case, variant, backend)
        no_end = {t: -1000.0 for t in llm.tokenizer.eot_ids}  # 32 tokens, no early stop
        runs.append([t.id for t in llm.generate(prompt, max_tokens=32, temperature=0.0,
                                                logit_bias=no_end)])
    assert len(runs[0]) == 32
    assert runs[0] == runs[1]


@pytest.mark.parametrize("case", CASES)
def test_tokenizer_ids_equal_hugging_face_tokenizers(case):
    g = golden(case, "f16")
    tok = load(case, "f16", "reference").tokenizer
    for i, text in enumerate(TEXTS):
        assert tok.encode(text, add_bos=False) == g[f"text{i}"].tolist(), text


# --- live: rebuild each case with transformers --------------------------------------------------

live = pytest.mark.skipif(not HAVE_TRANSFORMERS, reason="torch/transformers/tokenizers not "
                          "installed (the committed golden data is checked instead)")


@live
@pytest.mark.parametrize("case", CASES)
def test_live_transformers_agrees_and_the_committed_file_is_current(case, tmp_path):
    from engine.convert import convert
    from tests import arch_models

    model, tok = arch_models.build_hf(case, tmp_path / case, "f32")
    out = convert(tmp_path / case, tmp_path / f"{case}.gguf", outtype="f32")
    llm = engine.load_model(str(out), backend="reference")
    ids = arch_models.prompt_ids(tok.get_vocab_size())
    median, top1 = agreement(llm.logits(ids), arch_models.hf_logits(model, ids))
    assert median <= 1e-3 and top1 == 1.0, (median, top1)
    for text in TEXTS:
        assert llm.tokenizer.encode(text, add_bos=False) == tok.encode(
            text, add_special_tokens=False).ids, text
    made_with = json.loads((DATA / "versions.json").read_text())
    if made_with != arch_models.tool_versions():
        return  # other random weights or another trained vocabulary: nothing to compare
    convert(tmp_path / case, tmp_path / "again.f16.gguf", outtype="f16", name=f"tiny-{case}")
    committed = Path(DATA / f"{case}.f16.gguf").read_bytes()
    assert (tmp_path / "again.f16.gguf").read_bytes() == committed, (
        "tests/data/archs is out of date: python -m tests.arch_models")


@live
def test_live_a_bf16_checkpoint_converts_exactly(tmp_path):
    """A checkpoint saved in bfloat16 (as most are published) converts to the same numbers."""
    import torch

    from engine.convert import convert
    from tests import arch_models

    model, tok = arch_models.build_hf("qwen2", tmp_path / "hf", "f32")
    model.to(torch.bfloat16).save_pretrained(tmp_path / "hf")
    model.to(torch.float32)  # bf16-rounded weights, float32 maths
    out = convert(tmp_path / "hf", tmp_path / "bf16.gguf", outtype="bf16")
    llm = engine.load_model(str(out), backend="reference")
    ids = arch_models.prompt_ids(tok.get_vocab_size())
    median, top1 = agreement(llm.logits(ids), arch_models.hf_logits(model, ids))
    assert median <= 1e-3 and top1 == 1.0, (median, top1)


@live
@pytest.mark.skipif(not importlib.util.find_spec("accelerate"),
                    reason="transformers needs accelerate to read GGUF files")
@pytest.mark.parametrize("case", [c for c in CASES if c != "mistral"])  # no GGUF "mistral" map
def test_live_transformers_reads_the_committed_gguf_as_the_same_model(case, tmp_path):
    """transformers' own GGUF reader (`gguf_file=`, which undoes llama.cpp's conventions: the
    q/k permutation, Gemma's norm + 1, Phi-3's fused matrices) gets the very weights back, so
    our files are laid out as llama.cpp's. It is given the model's config: its GGUF config
    mapping drops rope_freqs, sliding windows and Qwen3's head_dim (0.35 median without)."""
    import torch
    import transformers

    from tests import arch_models

    config = arch_models.build_hf(case, tmp_path / case)[0].config
    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(DATA), gguf_file=f"{case}.f16.gguf", config=config, dtype=torch.float32).eval()
    g = golden(case, "f16")
    median, top1 = agreement(arch_models.hf_logits(model, g["ids"].tolist()), g["logits"])
    assert median <= 1e-5 and top1 == 1.0, (median, top1)
