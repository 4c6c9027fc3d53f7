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

# Bounds on what a header may declare, far above any real model (SmolLM2: 272 tensors, 40
# metadata entries, a 49k vocabulary; Gemma-3: 262k). Counts and lengths are checked against
# the bytes left in the file as well, but a file of 250 MB can still hold 30 million empty
# strings: these limits keep what one header makes the reader build to a few hundred MB.
MAX_TENSORS = 1 << 16
MAX_KV = 1 << 16
MAX_ARRAY = 1 << 22  # elements of one metadata array (4M: 16x the largest vocabulary)
MAX_STRING = 1 << 24  # bytes of one metadata string (chat templates: ~10 KB)
MAX_KEY = 1 << 10  # bytes of a metadata key or tensor name (llama.cpp: names of 64)
MAX_NESTING = 2  # an array of arrays at most (llama.cpp reads no nested arrays at all)
MAX_HPARAM = 1 << 27  # any size or count a model's metadata declares (context: 128M tokens)


@dataclass(frozen=True)
class TensorInfo:
    """One tensor: `shape` in NumPy order (n_out, n_in); `data` its raw bytes, memory-mapped."""

    name: str
    shape: tuple[int, ...]
    qtype: GGMLQuantizationType
    n_bytes: int
    data: np.ndarray  # (n_bytes,) uint8, a view into the file
    data_start: int = 0  # where `data` starts in the file

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

    def check_shapes(self, expected: dict[str, tuple[int | None, ...]]) -> None:
        """Every named tensor exists with that shape (NumPy order; None: any size); else one
        GGUFError. A model module calls it with the shapes its ModelArgs imply, before any
        weight is read."""
        for name, shape in expected.items():
            actual = self.tensors[name].shape
            if len(actual) != len(shape) or any(
                    want is not None and have != want for have, want in zip(actual, shape)):
                raise GGUFError(f"{self.path}: tensor {name} has shape {actual}, but the "
                                f"metadata implies {tuple(shape)}")

    def quant_mix(self) -> dict[str, int]:
        """Tensor count per quant type, most common first."""
        counts: dict[str, int] = {}
        for t in self.tensors.values():
            counts[t.qtype.name] = counts.get(t.qtype.name, 0) + 1
        return dict(sorted(counts.items(), key=lambda kv: -kv[1]))

    def parameter_count(self) -> int:
        return sum(t.n_elements for t in self.tensors.values())


_U64 = struct.Struct("<Q")
MANY_STRINGS = 4096  # a string array this long is read by `_Cursor._strings_at_once`


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

    def string(self, what: str, limit: int = MAX_STRING) -> str:
        n = self.u64(f"length of {what}")
        if n > limit and n <= len(self.buf) - self.pos:
            raise self.fail(f"{what} is {n} bytes long (at most {limit} are read)")
        return bytes(self.take(n, what)).decode("utf-8", errors="replace")

    def strings(self, count: int, what: str) -> list[str]:
        """`count` strings in a row (a vocabulary: 262k for Gemma-3). The same reads as
        `string`, in one loop with local names: ~4x faster, which a model load feels; a
        vocabulary goes through `_strings_at_once`, ~4x faster again."""
        if count >= MANY_STRINGS:
            out = self._strings_at_once(count)
            if out is not None:
                return out
        buf, pos, end = self.buf, self.pos, len(self.buf)
        length_at = _U64.unpack_from
        out = []
        for i in range(count):
            if pos + 8 > end:
                self.pos = pos
                raise self.fail(f"truncated: {what}[{i}] has no length at offset {pos}")
            (n,) = length_at(buf, pos)
            pos += 8
            if n > end - pos or n > MAX_STRING:
                self.pos = pos
                raise self.fail(f"truncated: needs {n} bytes for {what}[{i}] at offset "
                                f"{pos}, but the file is {end} bytes" if n > end - pos else
                                f"{what}[{i}] is {n} bytes long (at most {MAX_STRING} are read)")
            out.append(str(buf[pos:pos + n], "utf-8", "replace"))
            pos += n
        self.pos = pos
        return out

    def _strings_at_once(self, count: int) -> list[str] | None:
        """`strings` without a Python step per string: a kernel finds where each starts
        (kernels.strings), the 8-byte length fields are cut to one NUL each, and one UTF-8
        decode and one split make every `str`. None when that cannot give the same answer
        as the loop (a length out of bounds, which the loop reports; a string that holds a
        NUL or is not valid UTF-8, which it decodes one by one)."""
        from kernels.strings import string_starts

        buf = np.frombuffer(self.buf, np.uint8)  # (file bytes,) no copy
        starts = np.empty(count + 1, np.int64)
        if string_starts(buf, self.pos, count, MAX_STRING, starts) >= 0:
            return None
        region = buf[self.pos:starts[count]].copy()  # the records: length | bytes, ...
        fields = starts[:-1] - 8 - self.pos  # where each length field starts in `region`
        region[fields] = 0  # the NUL in front of each string
        keep = np.ones(len(region), bool)
        keep[(fields[:, None] + np.arange(1, 8)).reshape(-1)] = False  # the rest of the field
        try:
            text = region[keep].tobytes().decode("utf-8")
        except UnicodeDecodeError:
            return None
        out = text.split("\0")  # "", then the strings
        if len(out) != count + 1:
            return None  # a string held a NUL
        self.pos = int(starts[count])
        return out[1:]

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

    def array(self, what: str, depth: int = 1):
        """Numeric arrays become NumPy arrays (one vectorized read); string arrays lists."""
        etype = self.value_type(f"elements of {what}")
        count = self.u64(f"length of {what}")
        remaining = len(self.buf) - self.pos
        # the least each element takes: a string its 8-byte length, an inner array its type
        # and length, a number its size
        least = {GGUFValueType.STRING: 8, GGUFValueType.ARRAY: 12}.get(etype)
        itemsize = least or np.dtype(_NUMPY_DTYPES[etype]).itemsize
        if count * itemsize > remaining:
            raise self.fail(f"{what}: array of {count} elements cannot fit in the file")
        if count > MAX_ARRAY:
            raise self.fail(f"{what}: array of {count} elements is over the limit of "
                            f"{MAX_ARRAY}")
        if etype == GGUFValueType.STRING:
            return self.strings(count, what)
        if etype == GGUFValueType.ARRAY:
            if depth >= MAX_NESTING:
                raise self.fail(f"{what}: arrays nested more than {MAX_NESTING} deep")
            return [self.array(f"{what}[{i}]", depth + 1) for i in range(count)]
        raw = self.take(count * itemsize, what)
        return np.frombuffer(raw, dtype=np.dtype(_NUMPY_DTYPES[etype])).copy()


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
    if n_kv > MAX_KV or n_tensors > MAX_TENSORS:
        raise GGUFError(f"{path}: corrupt header: {n_tensors} tensors and {n_kv} metadata "
                        f"entries (at most {MAX_TENSORS} and {MAX_KV} are read)")

    metadata: dict[str, Any] = {}
    for i in range(n_kv):
        key = cur.string(f"metadata key #{i}", MAX_KEY)
        if key in metadata:
            raise cur.fail(f"metadata {_show(key)} appears twice")
        vtype = cur.value_type(f"metadata {_show(key)}")
        metadata[key] = cur.value(vtype, f"metadata {_show(key)}")

    infos = [_read_tensor_info(cur, i) for i in range(n_tensors)]
    alignment = metadata.get("general.alignment", DEFAULT_ALIGNMENT)
    if (not isinstance(alignment, int) or isinstance(alignment, bool) or alignment <= 0
            or alignment & (alignment - 1)):
        raise GGUFError(f"{path}: general.alignment {alignment!r} is not a power of two")
    data_offset = -(-cur.pos // alignment) * alignment

    tensors = Tensors(path)
    for name, shape, qtype, offset in infos:
        if name in tensors:
            raise GGUFError(f"{path}: tensor {_show(name)} appears twice")
        if offset % alignment:
            raise GGUFError(f"{path}: tensor {_show(name)} data offset {offset} is not a multiple "
                            f"of the alignment {alignment}")
        tensors[name] = _tensor(path, mm, name, shape, qtype, data_offset + offset, size)
    _check_overlaps(path, tensors, data_offset)
    gf = GGUFFile(path, version, metadata, tensors, data_offset)
    _check_required(gf)
    return gf


class Tensors(dict):
    """name → TensorInfo; a missing name is a GGUFError naming the file (a model module asks
    for the tensors its architecture needs: a file without one is damaged, not a bug)."""

    def __init__(self, path: str):
        super().__init__()
        self.path = path

    def __missing__(self, name: str):
        raise GGUFError(f"{self.path}: missing tensor {name}")


def _check_overlaps(path: str, tensors: Tensors, data_offset: int) -> None:
    """No two tensors share a byte (llama.cpp lays them out one after another)."""
    spans = sorted((t.data_start, t.data_start + t.n_bytes, t.name) for t in tensors.values())
    for (_, end, name), (start, _, other) in zip(spans, spans[1:]):
        if start < end:
            raise GGUFError(f"{path}: tensors {_show(name)} and {_show(other)} overlap (bytes "
                            f"{start - data_offset}..{end - data_offset} of the data)")


def _read_tensor_info(cur: _Cursor, i: int):
    name = cur.string(f"name of tensor #{i}", MAX_KEY)
    n_dims = cur.u32(f"dimension count of tensor {_show(name)}")
    if not 1 <= n_dims <= MAX_DIMS:
        raise cur.fail(f"tensor {_show(name)} has {n_dims} dimensions (1 to {MAX_DIMS} allowed)")
    dims = [cur.u64(f"dimensions of tensor {_show(name)}") for _ in range(n_dims)]
    raw_type = cur.u32(f"quant type of tensor {_show(name)}")
    offset = cur.u64(f"data offset of tensor {_show(name)}")
    try:
        qtype = GGMLQuantizationType(raw_type)
    except ValueError:
        raise cur.fail(f"tensor {_show(name)} has unknown quant type {raw_type}") from None
    if qtype not in SUPPORTED_QTYPES:
        raise cur.fail(f"tensor {_show(name)} uses quant type {qtype.name}, which numbalm does not "
                       f"support ({', '.join(sorted(t.name for t in SUPPORTED_QTYPES))})")
    if 0 in dims:
        raise cur.fail(f"tensor {_show(name)} has an empty dimension {dims}")
    shape = tuple(int(d) for d in reversed(dims))  # GGUF lists the innermost dim first
    return name, shape, qtype, offset


def _tensor(path, mm, name, shape, qtype, start, file_size) -> TensorInfo:
    block_size, type_size = GGML_QUANT_SIZES[qtype]
    n_in = shape[-1]
    if n_in == 0 or n_in % block_size:
        raise GGUFError(f"{path}: tensor {_show(name)} row length {n_in} is not a multiple of the "
                        f"{qtype.name} block size {block_size}")
    n_elements = int(np.prod(shape, dtype=object))  # Python ints: huge dims must not wrap
    n_bytes = n_elements // block_size * type_size
    if start + n_bytes > file_size:
        raise GGUFError(f"{path}: truncated: tensor {_show(name)} needs bytes "
                        f"{start}..{start + n_bytes} but the file is {file_size} bytes")
    return TensorInfo(name, shape, qtype, n_bytes, mm[start:start + n_bytes], start)


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
    _check_hparams(gf)
    tokens = gf.metadata["tokenizer.ggml.tokens"]
    if not isinstance(tokens, list) or not tokens or not isinstance(tokens[0], str):
        raise GGUFError(f"{gf.path}: tokenizer.ggml.tokens is not a list of strings")
    if "token_embd.weight" not in gf.tensors:
        raise GGUFError(f"{gf.path}: missing tensor token_embd.weight")
    # llama.cpp's check too: one embedding row per token, of the model's width.
    vocab_shape = (len(tokens), gf.arch("embedding_length"))
    for name in ("token_embd.weight", "output.weight"):
        if name in gf.tensors and gf.tensors[name].shape != vocab_shape:
            raise GGUFError(f"{gf.path}: tensor {name} has shape {gf.tensors[name].shape}, "
                            f"but the vocabulary and embedding_length make {vocab_shape}")


# The architecture keys the model modules read (`<arch>.` + key), and what each must be.
HPARAM_COUNTS = ("context_length", "embedding_length", "block_count", "feed_forward_length",
                 "attention.head_count", "attention.head_count_kv", "attention.key_length",
                 "attention.value_length", "attention.sliding_window", "max_seq_length")
HPARAM_EPSILONS = ("attention.layer_norm_rms_epsilon", "attention.layer_norm_epsilon")
HPARAM_BASES = ("rope.freq_base",)


def _check_hparams(gf: GGUFFile) -> None:
    """The sizes and counts a model module reads are whole numbers in 1..MAX_HPARAM, its
    epsilons numbers in (0, 1), rope bases at least 1: a module may use them as they are."""
    checks = [(HPARAM_COUNTS, f"a whole number in 1..{MAX_HPARAM}",
               lambda v: isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= MAX_HPARAM),
              (HPARAM_EPSILONS, "a number between 0 and 1",
               lambda v: isinstance(v, float) and 0.0 < v < 1.0),
              (HPARAM_BASES, "a number of at least 1",
               lambda v: isinstance(v, float) and 1.0 <= v < 1e12)]
    for keys, want, ok in checks:
        for key in keys:
            value = gf.arch(key)
            if value is not None and not ok(value):
                raise GGUFError(f"{gf.path}: metadata {gf.architecture}.{key} is "
                                f"{_show(value)}, not {want}")


def _show(value: Any) -> str:
    """A metadata value for an error message, cut short."""
    text = repr(value.tolist() if isinstance(value, np.ndarray) else value)
    return text if len(text) <= 60 else text[:57] + "..."
