"""Open and validate a GGUF model file: typed metadata and memory-mapped tensors.

GGUF (llama.cpp's format), version 2 or 3, little-endian:

    magic "GGUF" | version u32 | n_tensors u64 | n_kv u64
    n_kv ×      key: string | value_type u32 | value
    n_tensors × name: string | n_dims u32 | dims u64 × n_dims | qtype u32 | offset u64
    padding to `general.alignment` (default 32)
    tensor data: each tensor at data_start + offset

A string is a u64 byte length followed by UTF-8 bytes; an array is an element type u32, a u64
count and the elements. `gguf.GGUFReader` reads the same thing, but spends seconds parsing a
262k-token vocabulary one field at a time; this reader walks the header once with bounds checks
on every read, so a damaged file gives one clear `GGUFError` instead of an IndexError, a
MemoryError or a hang. GGUFReader remains the oracle in the tests.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from typing import Any

import numpy as np
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType

from .errors import GGUFError

GGUF_MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32

# The tensor formats numbalm can compute with (every one has a dequantizer in kernels/).
SUPPORTED_QTYPES = frozenset(
    GGMLQuantizationType[name]
    for name in (
        "F32 F16 BF16 Q4_0 Q4_1 Q5_0 Q5_1 Q8_0 Q2_K Q3_K Q4_K Q5_K Q6_K".split()
    )
)

# Metadata every architecture needs; `{arch}` is replaced by general.architecture.
_DECODER_KEYS = (
    "{arch}.context_length", "{arch}.embedding_length", "{arch}.block_count",
    "{arch}.feed_forward_length", "{arch}.attention.head_count",
    "{arch}.attention.layer_norm_rms_epsilon",
)
REQUIRED_KEYS = {
    "llama": _DECODER_KEYS,
    "qwen2": _DECODER_KEYS,
    "qwen3": _DECODER_KEYS,
    "phi3": _DECODER_KEYS,
    "gemma2": _DECODER_KEYS,
    "gemma3": _DECODER_KEYS + ("{arch}.attention.key_length",),
    "bert": (
        "{arch}.context_length", "{arch}.embedding_length", "{arch}.block_count",
        "{arch}.feed_forward_length", "{arch}.attention.head_count",
        "{arch}.attention.layer_norm_epsilon",
    ),
}
TOKENIZER_KEYS = ("tokenizer.ggml.model", "tokenizer.ggml.tokens")

# Scalar value types: (struct format, size in bytes).
_SCALARS = {
    GGUFValueType.UINT8: ("<B", 1), GGUFValueType.INT8: ("<b", 1),
    GGUFValueType.UINT16: ("<H", 2), GGUFValueType.INT16: ("<h", 2),
    GGUFValueType.UINT32: ("<I", 4), GGUFValueType.INT32: ("<i", 4),
    GGUFValueType.FLOAT32: ("<f", 4), GGUFValueType.BOOL: ("<?", 1),
    GGUFValueType.UINT64: ("<Q", 8), GGUFValueType.INT64: ("<q", 8),
    GGUFValueType.FLOAT64: ("<d", 8),
}
_NUMPY_DTYPES = {
    GGUFValueType.UINT8: "<u1", GGUFValueType.INT8: "<i1", GGUFValueType.UINT16: "<u2",
    GGUFValueType.INT16: "<i2", GGUFValueType.UINT32: "<u4", GGUFValueType.INT32: "<i4",
    GGUFValueType.FLOAT32: "<f4", GGUFValueType.BOOL: "?", GGUFValueType.UINT64: "<u8",
    GGUFValueType.INT64: "<i8", GGUFValueType.FLOAT64: "<f8",
}
MAX_DIMS = 4


@dataclass(frozen=True)
class TensorInfo:
    """One tensor: `shape` in NumPy order (n_out, n_in); `data` its raw bytes, memory-mapped."""

    name: str
    shape: tuple[int, ...]
    qtype: GGMLQuantizationType
    n_bytes: int
    data: np.ndarray  # (n_bytes,) uint8, a view into the file

    @property
    def n_elements(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))


class GGUFFile:
    """A validated GGUF file: `.metadata`, `.tensors`, `.architecture`."""

    def __init__(self, path: str, version: int, metadata: dict[str, Any],
                 tensors: dict[str, TensorInfo], data_offset: int):
        self.path = path
        self.version = version
        self.metadata = metadata
        self.tensors = tensors
        self.data_offset = data_offset

    @property
    def architecture(self) -> str:
        return self.metadata["general.architecture"]

    def get(self, key: str, default: Any = None) -> Any:
        return self.metadata.get(key, default)

    def arch(self, key: str, default: Any = None) -> Any:
        """Read `<architecture>.<key>`, e.g. `arch("embedding_length")`."""
        return self.metadata.get(f"{self.architecture}.{key}", default)

    @property
    def file_size(self) -> int:
        return os.path.getsize(self.path)

    def quant_mix(self) -> dict[str, int]:
        """Tensor count per quant type, most common first."""
        counts: dict[str, int] = {}
        for t in self.tensors.values():
            counts[t.qtype.name] = counts.get(t.qtype.name, 0) + 1
        return dict(sorted(counts.items(), key=lambda kv: -kv[1]))

    def parameter_count(self) -> int:
        return sum(t.n_elements for t in self.tensors.values())


_U64 = struct.Struct("<Q")


class _Cursor:
    """Reads little-endian values from a byte buffer; every read is bounds-checked."""

    def __init__(self, buf: memoryview, path: str):
        self.buf = buf
        self.pos = 0
        self.path = path

    def fail(self, what: str) -> GGUFError:
        return GGUFError(f"{self.path}: {what}")

    def take(self, n: int, what: str) -> memoryview:
        if n < 0 or self.pos + n > len(self.buf):
            raise self.fail(
                f"truncated: needs {n} bytes for {what} at offset {self.pos}, "
                f"but the file is {len(self.buf)} bytes"
            )
        chunk = self.buf[self.pos:self.pos + n]
        self.pos += n
        return chunk

    def scalar(self, vtype: GGUFValueType, what: str):
        fmt, size = _SCALARS[vtype]
        return struct.unpack(fmt, self.take(size, what))[0]

    def u32(self, what: str) -> int:
        return self.scalar(GGUFValueType.UINT32, what)

    def u64(self, what: str) -> int:
        return self.scalar(GGUFValueType.UINT64, what)

    def string(self, what: str) -> str:
        n = self.u64(f"length of {what}")
        return bytes(self.take(n, what)).decode("utf-8", errors="replace")

    def strings(self, count: int, what: str) -> list[str]:
        """`count` strings in a row (a vocabulary: 262k for Gemma-3). The same reads as
        `string`, in one loop with local names: ~4x faster, which a model load feels."""
        buf, pos, end = self.buf, self.pos, len(self.buf)
        length_at = _U64.unpack_from
        out = []
        for i in range(count):
            if pos + 8 > end:
                self.pos = pos
                raise self.fail(f"truncated: {what}[{i}] has no length at offset {pos}")
            (n,) = length_at(buf, pos)
            pos += 8
            if n > end - pos:
                self.pos = pos
                raise self.fail(f"truncated: needs {n} bytes for {what}[{i}] at offset "
                                f"{pos}, but the file is {end} bytes")
            out.append(str(buf[pos:pos + n], "utf-8", "replace"))
            pos += n
        self.pos = pos
        return out

    def value_type(self, what: str) -> GGUFValueType:
        raw = self.u32(f"type of {what}")
        try:
            return GGUFValueType(raw)
        except ValueError:
            raise self.fail(f"{what} has unknown value type {raw}") from None

    def value(self, vtype: GGUFValueType, what: str):
        if vtype == GGUFValueType.STRING:
            return self.string(what)
        if vtype == GGUFValueType.ARRAY:
            return self.array(what)
        return self.scalar(vtype, what)

    def array(self, what: str):
        """Numeric arrays become NumPy arrays (one vectorized read); string arrays lists."""
        etype = self.value_type(f"elements of {what}")
        count = self.u64(f"length of {what}")
        remaining = len(self.buf) - self.pos
        if etype == GGUFValueType.STRING:
            if count * 8 > remaining:  # each string needs at least its 8-byte length
                raise self.fail(f"{what}: array of {count} strings cannot fit in the file")
            return self.strings(count, what)
        if etype == GGUFValueType.ARRAY:
            if count > remaining:
                raise self.fail(f"{what}: nested array of {count} cannot fit in the file")
            return [self.array(f"{what}[{i}]") for i in range(count)]
        dtype = np.dtype(_NUMPY_DTYPES[etype])
        raw = self.take(count * dtype.itemsize, what)
        return np.frombuffer(raw, dtype=dtype).copy()


def open_gguf(path: str | os.PathLike) -> GGUFFile:
    """Open, parse and validate a GGUF file; raise GGUFError naming the file and the fault."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise GGUFError(f"{path}: no such file")
    size = os.path.getsize(path)
    if size == 0:
        raise GGUFError(f"{path}: the file is empty, not a GGUF model")
    try:
        mm = np.memmap(path, dtype=np.uint8, mode="r")
    except (OSError, ValueError) as e:
        raise GGUFError(f"{path}: cannot map the file: {e}") from None
    cur = _Cursor(memoryview(mm), path)

    magic = bytes(cur.take(4, "the magic number")) if size >= 4 else b""
    if magic != GGUF_MAGIC:
        raise GGUFError(f"{path}: not a GGUF file (starts with {bytes(mm[:4])!r}, not b'GGUF')")
    version = cur.u32("the version")
    if version not in SUPPORTED_VERSIONS:
        raise GGUFError(f"{path}: GGUF version {version} is not supported (only 2 and 3)")
    n_tensors = cur.u64("the tensor count")
    n_kv = cur.u64("the metadata count")
    # Smallest possible entries: a kv is key length + 1-byte key + type + 1-byte value;
    # a tensor info is name length + 1-byte name + n_dims + 1 dim + type + offset.
    if n_kv * 14 > size or n_tensors * 33 > size:
        raise GGUFError(
            f"{path}: corrupt header: {n_tensors} tensors and {n_kv} metadata entries "
            f"cannot fit in {size} bytes"
        )

    metadata: dict[str, Any] = {}
    for i in range(n_kv):
        key = cur.string(f"metadata key #{i}")
        vtype = cur.value_type(f"metadata {key!r}")
        metadata[key] = cur.value(vtype, f"metadata {key!r}")

    infos = [_read_tensor_info(cur, i) for i in range(n_tensors)]
    alignment = metadata.get("general.alignment", DEFAULT_ALIGNMENT)
    if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
        raise GGUFError(f"{path}: general.alignment {alignment!r} is not a power of two")
    data_offset = -(-cur.pos // alignment) * alignment

    tensors = {}
    for name, shape, qtype, offset in infos:
        tensors[name] = _tensor(path, mm, name, shape, qtype, data_offset + offset, size)
    gf = GGUFFile(path, version, metadata, tensors, data_offset)
    _check_required(gf)
    return gf


def _read_tensor_info(cur: _Cursor, i: int):
    name = cur.string(f"name of tensor #{i}")
    n_dims = cur.u32(f"dimension count of tensor {name!r}")
    if not 1 <= n_dims <= MAX_DIMS:
        raise cur.fail(f"tensor {name!r} has {n_dims} dimensions (1 to {MAX_DIMS} allowed)")
    dims = [cur.u64(f"dimensions of tensor {name!r}") for _ in range(n_dims)]
    raw_type = cur.u32(f"quant type of tensor {name!r}")
    offset = cur.u64(f"data offset of tensor {name!r}")
    try:
        qtype = GGMLQuantizationType(raw_type)
    except ValueError:
        raise cur.fail(f"tensor {name!r} has unknown quant type {raw_type}") from None
    if qtype not in SUPPORTED_QTYPES:
        raise cur.fail(f"tensor {name!r} uses quant type {qtype.name}, which numbalm does not "
                       f"support ({', '.join(sorted(t.name for t in SUPPORTED_QTYPES))})")
    shape = tuple(int(d) for d in reversed(dims))  # GGUF lists the innermost dim first
    return name, shape, qtype, offset


def _tensor(path, mm, name, shape, qtype, start, file_size) -> TensorInfo:
    block_size, type_size = GGML_QUANT_SIZES[qtype]
    n_in = shape[-1]
    if n_in == 0 or n_in % block_size:
        raise GGUFError(f"{path}: tensor {name!r} row length {n_in} is not a multiple of the "
                        f"{qtype.name} block size {block_size}")
    n_elements = int(np.prod(shape, dtype=object))  # Python ints: huge dims must not wrap
    n_bytes = n_elements // block_size * type_size
    if start + n_bytes > file_size:
        raise GGUFError(f"{path}: truncated: tensor {name!r} needs bytes {start}..{start + n_bytes}"
                        f" but the file is {file_size} bytes")
    return TensorInfo(name, shape, qtype, n_bytes, mm[start:start + n_bytes])


def _check_required(gf: GGUFFile) -> None:
    arch = gf.metadata.get("general.architecture")
    if not isinstance(arch, str):
        raise GGUFError(f"{gf.path}: missing metadata general.architecture")
    if arch not in REQUIRED_KEYS:
        raise GGUFError(f"{gf.path}: architecture {arch!r} is not supported "
                        f"(numbalm runs {', '.join(sorted(REQUIRED_KEYS))})")
    keys = [k.format(arch=arch) for k in REQUIRED_KEYS[arch]] + list(TOKENIZER_KEYS)
    missing = [k for k in keys if k not in gf.metadata]
    if missing:
        raise GGUFError(f"{gf.path}: missing metadata for {arch}: {', '.join(missing)}")
    if "token_embd.weight" not in gf.tensors:
        raise GGUFError(f"{gf.path}: missing tensor token_embd.weight")
