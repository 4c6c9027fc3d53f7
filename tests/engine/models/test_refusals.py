"""A file that asks for maths numbalm does not implement is refused at load, by name
(engine/models/support.py), and an unknown architecture gets one line naming the known ones."""

from __future__ import annotations

import numpy as np
import pytest

import engine
from engine.errors import GGUFError
from tests.tiny_models import write_tiny


def load(path):
    return engine.load_model(str(path), backend="reference")


@pytest.mark.parametrize("key, value, shown", [
    ("llama.rope.scaling.type", "yarn", "llama.rope.scaling.type = 'yarn'"),
    ("llama.attn_logit_softcapping", 50.0, "llama.attn_logit_softcapping = 50.0"),
    ("llama.final_logit_softcapping", 30.0, "llama.final_logit_softcapping = 30.0"),
    ("llama.expert_count", 8, "llama.expert_count = 8"),
    ("llama.rope.dimension_count", 8, "partial rotary"),
    ("gemma3.attn_logit_softcapping", 50.0, "gemma3.attn_logit_softcapping = 50.0"),
])
def test_maths_changing_metadata_is_refused_by_name(tmp_path, key, value, shown):
    arch = key.split(".")[0]
    path = write_tiny(tmp_path / "m.gguf", arch, metadata={key: value})
    with pytest.raises(GGUFError, match="refused rather than run wrong") as e:
        load(path)
    assert shown in str(e.value)


def test_every_refused_feature_is_listed_at_once(tmp_path):
    path = write_tiny(tmp_path / "m.gguf", metadata={"llama.attn_logit_softcapping": 50.0,
                                                     "llama.logit_scale": 0.5})
    with pytest.raises(GGUFError) as e:
        load(path)
    assert "attn_logit_softcapping = 50.0" in str(e.value)
    assert "logit_scale = 0.5" in str(e.value)


def test_features_left_off_load(tmp_path):
    path = write_tiny(tmp_path / "m.gguf", metadata={"llama.rope.scaling.type": "none",
                                                     "llama.expert_count": 0,
                                                     "llama.rope.dimension_count": 16})
    assert load(path).logits([1, 259]).shape == (2, 262)


def test_tensors_the_model_does_not_read_are_refused_by_pattern(tmp_path):
    extra = {f"blk.{i}.attn_q.bias": np.zeros(64) for i in range(2)}
    extra["mystery.weight"] = np.zeros((4, 64))
    path = write_tiny(tmp_path / "m.gguf", extra_tensors=extra)
    with pytest.raises(GGUFError, match="tensors numbalm does not implement") as e:
        load(path)
    assert "blk.*.attn_q.bias (2 layers)" in str(e.value)
    assert "mystery.weight" in str(e.value)


def test_an_unknown_architecture_is_one_line_naming_the_known_ones(tmp_path):
    path = write_tiny(tmp_path / "m.gguf", "falcon")
    with pytest.raises(GGUFError) as e:
        load(path)
    message = str(e.value)
    assert "\n" not in message and "'falcon'" in message
    for arch in ("llama", "gemma3", "bert"):
        assert arch in message


def test_llama3_rope_freqs_and_linear_scaling_change_the_logits(tmp_path):
    ids = list(range(3, 40))
    plain = load(write_tiny(tmp_path / "plain.gguf")).logits(ids)
    freqs = np.linspace(1, 8, 8).astype(np.float32)  # head_dim 16: 8 pairs
    llama3 = load(write_tiny(tmp_path / "llama3.gguf", extra_tensors={"rope_freqs.weight": freqs}))
    linear = load(write_tiny(tmp_path / "linear.gguf", metadata={
        "llama.rope.scaling.type": "linear", "llama.rope.scaling.factor": 4.0}))
    for scaled in (llama3.logits(ids), linear.logits(ids)):
        np.testing.assert_allclose(scaled[0], plain[0], rtol=1e-5, atol=1e-5)  # position 0
        assert np.abs(scaled[1:] - plain[1:]).max() > 1e-3


def test_a_missing_tensor_is_named(tmp_path):
    from engine.backends import get_backend
    from engine.gguf_file import open_gguf
    from engine.models import build_model, describe

    path = write_tiny(tmp_path / "m.gguf", n_layers=1)
    gf = open_gguf(path)
    del gf.tensors["blk.0.ffn_down.weight"]
    with pytest.raises(GGUFError, match="missing tensor blk.0.ffn_down.weight"):
        build_model(gf, get_backend("reference"))
    assert describe(gf)["supported"] is False


def test_describe_says_what_a_file_runs_and_can_do_without_loading_weights(tmp_path):
    from engine.gguf_file import open_gguf
    from engine.models import describe
    from tests.arch_models import DATA

    gemma2 = describe(open_gguf(DATA / "gemma2.q8_0.gguf"))
    assert gemma2["supported"] and gemma2["refused"] is None
    # the tiny files carry no chat template: base models, which do not chat
    assert gemma2["capabilities"] == ["completion", "embeddings"]
    assert "attn_logit_softcapping = 3.0" in gemma2["features"]
    assert "rope scaling llama3 (rope_freqs)" in describe(
        open_gguf(DATA / "llama3.q8_0.gguf"))["features"]
    refused = describe(open_gguf(write_tiny(tmp_path / "m.gguf", metadata={
        "llama.rope.scaling.type": "yarn"})))
    assert not refused["supported"] and "yarn" in refused["refused"]
