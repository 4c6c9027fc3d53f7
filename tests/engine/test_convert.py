"""engine.convert: a BERT sentence-transformers folder → GGUF in llama.cpp's `bert` layout.

Most tests convert a tiny random BERT folder built here (a few KB); the last ones load the
real converted all-MiniLM-L6-v2 (from `make models`) in llama.cpp, when it is installed.
"""

import json
from pathlib import Path

import numpy as np
import pytest
from gguf import GGMLQuantizationType
from safetensors.numpy import save_file

from engine.convert import ConvertError, convert, to_phantom
from engine.gguf_file import open_gguf
from server.cli import main
from tests.helpers import load_data, model_path

VOCAB = ["[PAD]", "[unused0]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "cat", "sat",
         "un", "##believ", "##able", ".", ",", "!", "a", "##b", "##s"]
DIM, FFN, N_LAYERS, N_CTX = 8, 16, 2, 32


def bert_tensors(rng, n_vocab=len(VOCAB), n_layers=N_LAYERS) -> dict[str, np.ndarray]:
    """HF BertModel tensor names and shapes, random values; with the pooler and position_ids
    a real checkpoint also carries."""

    def rand(*shape):
        return rng.standard_normal(shape).astype(np.float32)

    t = {"embeddings.word_embeddings.weight": rand(n_vocab, DIM),
         "embeddings.position_embeddings.weight": rand(N_CTX, DIM),
         "embeddings.token_type_embeddings.weight": rand(2, DIM),
         "embeddings.LayerNorm.weight": rand(DIM), "embeddings.LayerNorm.bias": rand(DIM),
         "embeddings.position_ids": np.arange(N_CTX, dtype=np.int64)[None],
         "pooler.dense.weight": rand(DIM, DIM), "pooler.dense.bias": rand(DIM)}
    for i in range(n_layers):
        p = f"encoder.layer.{i}."
        for name, shape in (("attention.self.query", (DIM, DIM)),
                            ("attention.self.key", (DIM, DIM)),
                            ("attention.self.value", (DIM, DIM)),
                            ("attention.output.dense", (DIM, DIM)),
                            ("intermediate.dense", (FFN, DIM)), ("output.dense", (DIM, FFN))):
            t[p + name + ".weight"], t[p + name + ".bias"] = rand(*shape), rand(shape[0])
        for name in ("attention.output.LayerNorm", "output.LayerNorm"):
            t[p + name + ".weight"], t[p + name + ".bias"] = rand(DIM), rand(DIM)
    return t


def make_bert_folder(path: Path, seed: int = 0, pooling: str = "mean", **config) -> Path:
    """A tiny sentence-transformers BERT folder: config.json, vocab.txt, model.safetensors,
    modules.json, 1_Pooling/config.json, special_tokens_map.json."""
    path.mkdir(parents=True, exist_ok=True)
    cfg = {"architectures": ["BertModel"], "model_type": "bert", "vocab_size": len(VOCAB),
           "hidden_size": DIM, "intermediate_size": FFN, "num_hidden_layers": N_LAYERS,
           "num_attention_heads": 2, "max_position_embeddings": N_CTX, "layer_norm_eps": 1e-12,
           "type_vocab_size": 2, **config}
    (path / "config.json").write_text(json.dumps(cfg))
    (path / "vocab.txt").write_text("\n".join(VOCAB) + "\n")
    (path / "special_tokens_map.json").write_text(json.dumps(
        {"unk_token": "[UNK]", "sep_token": "[SEP]", "pad_token": "[PAD]",
         "cls_token": "[CLS]", "mask_token": "[MASK]"}))
    (path / "modules.json").write_text(json.dumps(
        [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
         {"idx": 1, "name": "1", "path": "1_Pooling",
          "type": "sentence_transformers.models.Pooling"}]))
    (path / "1_Pooling").mkdir(exist_ok=True)
    (path / "1_Pooling" / "config.json").write_text(json.dumps(
        {"word_embedding_dimension": DIM, "pooling_mode_cls_token": pooling == "cls",
         "pooling_mode_mean_tokens": pooling == "mean"}))
    save_file(bert_tensors(np.random.default_rng(seed)), str(path / "model.safetensors"),
              metadata={"format": "pt"})
    return path


@pytest.fixture
def src(tmp_path):
    return make_bert_folder(tmp_path / "tiny-bert")


def block_names(i: int) -> set[str]:
    kinds = ("attn_q", "attn_k", "attn_v", "attn_output", "attn_output_norm", "ffn_up",
             "ffn_down", "layer_output_norm")
    return {f"blk.{i}.{k}.{s}" for k in kinds for s in ("weight", "bias")}


def test_tensors_are_renamed_and_copied_exactly(src, tmp_path):
    gf = open_gguf(convert(src, tmp_path / "out.gguf"))
    want = {"token_embd.weight", "token_types.weight", "position_embd.weight",
            "token_embd_norm.weight", "token_embd_norm.bias"}
    want |= block_names(0) | block_names(1)
    assert set(gf.tensors) == want  # pooler and position_ids dropped
    hf = bert_tensors(np.random.default_rng(0))
    for gguf_name, hf_name in (("token_embd.weight", "embeddings.word_embeddings.weight"),
                               ("blk.1.ffn_up.weight", "encoder.layer.1.intermediate.dense.weight"),
                               ("blk.0.attn_q.bias", "encoder.layer.0.attention.self.query.bias"),
                               ("token_types.weight", "embeddings.token_type_embeddings.weight")):
        t = gf.tensors[gguf_name]
        assert t.qtype == GGMLQuantizationType.F32 and t.shape == hf[hf_name].shape
        np.testing.assert_array_equal(t.data.view(np.float32).reshape(t.shape), hf[hf_name])


def test_metadata_follows_llama_cpp_bert(src, tmp_path):
    gf = open_gguf(convert(src, tmp_path / "out.gguf", name="Tiny BERT"))
    m = gf.metadata
    assert gf.architecture == "bert" and m["general.name"] == "Tiny BERT"
    assert (gf.arch("context_length"), gf.arch("embedding_length"),
            gf.arch("feed_forward_length"), gf.arch("block_count")) == (N_CTX, DIM, FFN, 2)
    assert gf.arch("attention.head_count") == 2
    assert gf.arch("attention.layer_norm_epsilon") == pytest.approx(1e-12)
    assert gf.arch("attention.causal") is False and gf.arch("pooling_type") == 1  # MEAN
    assert m["tokenizer.ggml.model"] == "bert" and m["tokenizer.ggml.token_type_count"] == 2
    assert m["tokenizer.ggml.tokens"][:9] == ["[PAD]", "▁[unused0]", "[UNK]", "[CLS]", "[SEP]",
                                             "[MASK]", "▁the", "▁cat", "▁sat"]
    assert m["tokenizer.ggml.tokens"][9:12] == ["▁un", "believ", "able"]
    assert list(m["tokenizer.ggml.token_type"][:7]) == [3, 1, 3, 3, 3, 3, 1]  # CONTROL, NORMAL
    ids = {k: m[f"tokenizer.ggml.{k}"] for k in ("bos_token_id", "eos_token_id",
           "unknown_token_id", "seperator_token_id", "padding_token_id", "mask_token_id")}
    assert ids == {"bos_token_id": 3, "eos_token_id": 4, "unknown_token_id": 2,
                   "seperator_token_id": 4, "padding_token_id": 0, "mask_token_id": 5}
    assert m["tokenizer.ggml.add_bos_token"] is True and m["tokenizer.ggml.add_eos_token"] is True


def test_phantom_form():
    assert [to_phantom(t) for t in ("the", "##ing", "[unused3]", "#")] == [
        "▁the", "ing", "▁[unused3]", "▁#"]


def test_cls_pooling(tmp_path):
    src = make_bert_folder(tmp_path / "cls", pooling="cls")
    assert open_gguf(convert(src, tmp_path / "o.gguf")).arch("pooling_type") == 2


def test_f16_keeps_1d_tensors_and_tables_f32(src, tmp_path):
    gf = open_gguf(convert(src, tmp_path / "out.gguf", outtype="f16"))
    types = {name: t.qtype for name, t in gf.tensors.items()}
    f32 = {n for n, q in types.items() if q == GGMLQuantizationType.F32}
    assert {n for n, q in types.items() if q == GGMLQuantizationType.F16} == {
        "token_embd.weight", *(f"blk.{i}.{k}.weight" for i in range(2) for k in
                               ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_up",
                                "ffn_down"))}
    assert {"position_embd.weight", "token_types.weight", "blk.0.attn_q.bias",
            "blk.1.layer_output_norm.weight"} <= f32
    assert gf.metadata["general.file_type"] == 1  # MOSTLY_F16


def test_output_is_deterministic(src, tmp_path):
    a = convert(src, tmp_path / "a.gguf").read_bytes()
    b = convert(src, tmp_path / "b.gguf").read_bytes()
    assert a == b
    c = convert(src, tmp_path / "c.gguf", outtype="f16").read_bytes()
    assert c == convert(src, tmp_path / "d.gguf", outtype="f16").read_bytes() and c != a


@pytest.mark.parametrize("breakage, message", [
    ("no-dir", "not a directory"),
    ("config.json", r"config.json: missing"),
    ("vocab.txt", r"vocab.txt: missing"),
    ("model.safetensors", r"model.safetensors: missing"),
    ("1_Pooling/config.json", r"1_Pooling/config.json: missing"),
    ("arch", "architecture GPTNeoXForCausalLM is not supported"),
    ("tensor", "missing tensors blk.1.attn_k.weight"),
    ("garbage", "cannot read the weights"),
])
def test_bad_input_is_one_clear_error(tmp_path, breakage, message):
    src = make_bert_folder(tmp_path / "src")
    if breakage == "no-dir":
        src = tmp_path / "nowhere"
    elif breakage == "arch":
        (src / "config.json").write_text(json.dumps(
            {"architectures": ["GPTNeoXForCausalLM"], "model_type": "gpt_neox"}))
    elif breakage == "tensor":
        t = bert_tensors(np.random.default_rng(0))
        del t["encoder.layer.1.attention.self.key.weight"]
        save_file(t, str(src / "model.safetensors"))
    elif breakage == "garbage":
        (src / "model.safetensors").write_bytes(b"\xff" * 64)
    else:
        (src / breakage).unlink()
    with pytest.raises(ConvertError, match=message):
        convert(src, tmp_path / "out.gguf")
    assert sorted(p.name for p in tmp_path.iterdir() if p.name != "src") == []  # no .part


def test_cli_convert(src, tmp_path, capsys):
    out = tmp_path / "cli.gguf"
    assert main(["convert", str(src), str(out), "--outtype", "f16"]) == 0
    assert "wrote" in capsys.readouterr().out and open_gguf(out).architecture == "bert"
    assert main(["convert", str(tmp_path / "nowhere"), str(out)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("numbalm: error:") and err.count("\n") == 1 and "Traceback" not in err


# --- the real converted model -----------------------------------------------------------------


def test_max_seq_length_comes_from_sentence_bert_config(src, tmp_path):
    assert open_gguf(convert(src, tmp_path / "a.gguf")).arch("max_seq_length") is None
    (src / "sentence_bert_config.json").write_text('{"max_seq_length": 7}')
    assert open_gguf(convert(src, tmp_path / "b.gguf")).arch("max_seq_length") == 7


def test_real_minilm_file():
    gf = open_gguf(model_path("minilm"))
    assert gf.architecture == "bert" and gf.quant_mix() == {"F32": 101}
    assert gf.arch("embedding_length") == 384 and gf.arch("pooling_type") == 1
    assert gf.arch("max_seq_length") == 256  # sentence-transformers truncates there
    assert len(gf.metadata["tokenizer.ggml.tokens"]) == 30522


def test_real_minilm_loads_in_llama_cpp():
    llama_cpp = pytest.importorskip(
        "llama_cpp", reason="llama-cpp-python is not installed (not in [dev]); it checks that "
                            "our GGUF also loads in llama.cpp")
    llm = llama_cpp.Llama(model_path("minilm"), embedding=True, verbose=False, n_threads=2)
    assert llm.metadata["general.architecture"] == "bert"
    for e in load_data("minilm.embeddings.json")["embeddings"][:4]:
        vec = np.asarray(llm.embed(e["text"]), dtype=np.float64)
        ref = np.asarray(e["vector"])
        assert vec.shape == (384,)
        cosine = vec @ ref / np.linalg.norm(vec) / np.linalg.norm(ref)
        assert cosine > 0.9999, e["text"]


def test_safetensors_reader_widens_bf16_exactly(tmp_path):
    """NumPy has no bfloat16: the decoder converter reads BF16 checkpoints itself."""
    import struct

    from engine.convert_decoder import read_safetensors

    want = np.array([[1.0, -2.5, 3.140625], [0.0, 1e-3, -65280.0]], np.float32)
    bf16 = (want.view(np.uint32) >> 16).astype(np.uint16)  # exact for these values but 1e-3
    f16 = want.astype(np.float16)
    header = json.dumps({"a": {"dtype": "BF16", "shape": [2, 3], "data_offsets": [0, 12]},
                         "b": {"dtype": "F16", "shape": [2, 3], "data_offsets": [12, 24]},
                         "__metadata__": {"format": "pt"}}).encode()
    path = tmp_path / "model.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header + bf16.tobytes() + f16.tobytes())
    got = read_safetensors(path)
    np.testing.assert_array_equal(got["a"], (bf16.astype(np.uint32) << 16).view(np.float32))
    np.testing.assert_allclose(got["a"], want, rtol=2**-8)
    np.testing.assert_array_equal(got["b"], f16)
