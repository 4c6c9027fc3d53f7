"""kernels.dequant equals gguf.quants.dequantize bit for bit: random blocks and real models."""


import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q

from kernels import dequant
from kernels.dequant import BLOCK_SIZE, TYPE_SIZE, dequantize, dequantize_rows
from kernels.testing import F16_FIELDS as QUANT_F16_FIELDS
from tests.helpers import model_path

# Random bytes in the f16 scale fields could be inf/NaN, which would make the comparison
# meaningless; kernels.testing.F16_FIELDS says where they are, every other byte stays random.
FLOAT_TYPES = {Q.F32: [], Q.F16: [], Q.BF16: []}
F16_FIELDS = {**FLOAT_TYPES, **QUANT_F16_FIELDS}
QTYPES = list(F16_FIELDS)


def random_blocks(qtype: Q, n_rows: int, blocks_per_row: int, seed: int = 0) -> np.ndarray:
    """Random bytes of an `(n_rows, row_bytes)` tensor whose f16 scales are small and finite."""
    rng = np.random.default_rng([seed, int(qtype), n_rows, blocks_per_row])
    n_blocks = n_rows * blocks_per_row
    blocks = rng.integers(0, 256, (n_blocks, TYPE_SIZE[qtype]), dtype=np.uint8)
    for offset in F16_FIELDS[qtype]:
        scale = (rng.standard_normal(n_blocks) * 1e-2).astype(np.float16)  # (n_blocks,)
        blocks[:, offset : offset + 2] = scale.view(np.uint8).reshape(n_blocks, 2)
    return blocks.reshape(n_rows, blocks_per_row * TYPE_SIZE[qtype])


def assert_bit_exact(actual: np.ndarray, expected: np.ndarray) -> None:
    """Equal shapes, dtype float32 and identical bits (so -0.0 != 0.0 and NaN payloads count)."""
    assert actual.dtype == np.float32
    assert actual.shape == expected.shape
    np.testing.assert_array_equal(actual.view(np.uint32), expected.view(np.uint32))


def oracle(raw: np.ndarray, qtype: Q, shape: tuple) -> np.ndarray:
    return np.asarray(gguf.quants.dequantize(raw, qtype), dtype=np.float32).reshape(shape)


# --- random blocks -------------------------------------------------------------------------------


def test_tables_cover_every_format():
    for qtype in QTYPES:
        assert qtype in dequant.DEQUANT
        assert (BLOCK_SIZE[qtype], TYPE_SIZE[qtype]) == gguf.GGML_QUANT_SIZES[qtype]


@pytest.mark.parametrize("blocks_per_row", [1, 2, 37])
@pytest.mark.parametrize("qtype", QTYPES, ids=lambda q: q.name)
def test_random_blocks_match_gguf(qtype, blocks_per_row):
    raw = random_blocks(qtype, 3, blocks_per_row)  # (3, row_bytes)
    shape = (3, blocks_per_row * BLOCK_SIZE[qtype])
    expected = oracle(raw, qtype, shape)
    assert_bit_exact(dequantize(raw, qtype, shape), expected)
    assert_bit_exact(dequantize(raw.reshape(-1), int(qtype), shape), expected)  # flat, int qtype


@pytest.mark.parametrize("qtype", QTYPES, ids=lambda q: q.name)
def test_ref_functions_give_one_row_per_block(qtype):
    raw = random_blocks(qtype, 5, 1)  # (5 blocks, type_size)
    out = dequant.DEQUANT[qtype](raw)
    assert out.shape == (5, BLOCK_SIZE[qtype])
    assert_bit_exact(out, oracle(raw, qtype, out.shape))


@pytest.mark.parametrize("qtype", QTYPES, ids=lambda q: q.name)
def test_chunk_boundaries(qtype):
    """A tensor a little longer than two chunks, so the last chunk is partial."""
    blocks_per_chunk = max(1, dequant._CHUNK_ELEMENTS // BLOCK_SIZE[qtype])
    n_blocks = 2 * blocks_per_chunk + 3
    raw = random_blocks(qtype, 1, n_blocks, seed=1)
    shape = (n_blocks * BLOCK_SIZE[qtype],)
    assert_bit_exact(dequantize(raw, qtype, shape), oracle(raw, qtype, shape))


@pytest.mark.parametrize("qtype", QTYPES, ids=lambda q: q.name)
def test_rows_match_slices_of_whole(qtype):
    raw = random_blocks(qtype, 10, 4, seed=2)
    shape = (10, 4 * BLOCK_SIZE[qtype])
    whole = dequantize(raw, qtype, shape)
    rows = np.array([7, 0, 7, 9, 3])
    assert_bit_exact(dequantize_rows(raw.reshape(-1), qtype, shape, rows), whole[rows])
    assert dequantize_rows(raw, qtype, shape, np.array([], dtype=np.int64)).shape == (0, shape[1])


def test_float_formats_keep_special_values():
    # all exact in bf16 (low 16 bits zero), including a float32 subnormal
    values = np.array([0.0, -0.0, np.inf, -np.inf, np.nan, 2.0**-130, 3.5], dtype=np.float32)
    assert_bit_exact(dequantize(values.view(np.uint8), Q.F32, (7,)), values)
    half = values.astype(np.float16)  # (7,)
    assert_bit_exact(dequantize(half.view(np.uint8), Q.F16, (7,)), half.astype(np.float32))
    bf16 = (values.view(np.uint32) >> 16).astype(np.uint16)  # (7,)
    assert_bit_exact(dequantize(bf16.view(np.uint8), Q.BF16, (7,)), values)


def test_result_is_a_fresh_writable_array():
    raw = np.arange(8, dtype=np.float32).view(np.uint8)
    raw.flags.writeable = False
    out = dequantize(raw, Q.F32, (2, 4))
    out[0, 0] = 42.0
    assert raw.view(np.float32)[0] == 0.0


def test_bad_arguments_raise():
    raw = random_blocks(Q.Q4_0, 2, 2)  # (2, 36)
    with pytest.raises(ValueError, match="block size"):
        dequantize(raw, Q.Q4_0, (2, 48))
    with pytest.raises(ValueError, match="do not hold"):
        dequantize(raw, Q.Q4_0, (3, 64))
    with pytest.raises(NotImplementedError, match="IQ2_XXS"):
        dequantize(raw, Q.IQ2_XXS, (1, 256))
    with pytest.raises(IndexError):
        dequantize_rows(raw, Q.Q4_0, (2, 64), np.array([2]))


# --- real models ---------------------------------------------------------------------------------


def open_model(key: str) -> dict[str, gguf.ReaderTensor]:
    """The real model's tensors through GGUFReader (the registry's file; see conftest)."""
    return {t.name: t for t in gguf.GGUFReader(model_path(key)).tensors}


@pytest.fixture(scope="module")
def smollm2():
    return open_model("smollm2")


@pytest.fixture(scope="module")
def gemma3():
    return open_model("gemma3")


def numpy_shape(t: gguf.ReaderTensor) -> tuple:
    return tuple(int(n) for n in reversed(t.shape))  # GGUF lists dims innermost first


def check_tensors(tensors: dict, qtype: Q, limit: int = 3, skip: tuple = ()) -> None:
    """Compare the first `limit` tensors of `qtype` with gguf, whole and bit for bit."""
    picked = [t for t in tensors.values() if t.tensor_type == qtype and t.name not in skip]
    assert picked, f"no {qtype.name} tensor in the model"
    for t in picked[:limit]:
        shape = numpy_shape(t)
        raw = np.asarray(t.data).view(np.uint8).reshape(-1)  # flat, as engine's TensorInfo gives
        assert_bit_exact(dequantize(raw, qtype, shape), oracle(t.data, qtype, shape))


@pytest.mark.parametrize("qtype", [Q.Q4_1, Q.Q8_0, Q.F32], ids=lambda q: q.name)
def test_smollm2_tensors(smollm2, qtype):
    check_tensors(smollm2, qtype)


@pytest.mark.parametrize("qtype", [Q.Q5_0, Q.Q4_K, Q.Q6_K, Q.Q8_0, Q.F32], ids=lambda q: q.name)
def test_gemma3_tensors(gemma3, qtype):
    check_tensors(gemma3, qtype, skip=("token_embd.weight",))  # 671 MB as float32


@pytest.mark.parametrize("model", ["smollm2", "gemma3"])
def test_embedding_rows(model, request):
    t = request.getfixturevalue(model)["token_embd.weight"]
    shape = numpy_shape(t)
    rows = np.array([0, 1, 2, shape[0] // 2, shape[0] - 1, 1])
    expected = oracle(t.data[rows], t.tensor_type, (len(rows), shape[1]))
    assert_bit_exact(dequantize_rows(t.data, t.tensor_type, shape, rows), expected)
