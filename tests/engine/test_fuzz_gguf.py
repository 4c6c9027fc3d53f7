"""Fuzzing the GGUF reader, the model load and the registry with mutated real files.

Seeds: tiny random models of each architecture (tests/tiny_models.py, loaded in full and run
for one token) and the headers of the real SmolLM2 and all-MiniLM files (their tensor data
left sparse: parsed, tokenizer built and every tensor's shape checked, no weights read).
Each case applies 1-4 mutations: truncation, bit flips, a count/length/type/offset field
overwritten (huge, zero, off by a block, another field's value: overlapping tensors,
misaligned data, a vocabulary that disagrees with the embedding table), bytes inserted or cut.

Pass: the file loads and runs, or it is refused with one GGUFError naming the file, on one
line; never another exception; and parsing one header never allocates more than
`MEMORY_BOUND` (tracemalloc counts NumPy's allocations too).

`make test` runs a few hundred derandomized cases; `make fuzz` (NUMBALM_FUZZ=1) >= 10,000.
"""

from __future__ import annotations

import shutil
import struct
import tracemalloc
from dataclasses import dataclass
from pathlib import Path

import pytest
from gguf import GGMLQuantizationType, GGUFReader
from hypothesis import event, given
from hypothesis import strategies as st

import engine
from engine.errors import GGUFError, RegistryError, TokenizerError
from engine.gguf_file import open_gguf
from engine.models import architecture_module
from engine.registry import Registry
from engine.tokenizer import Tokenizer
from tests.fuzz import fuzz_settings
from tests.helpers import model_path
from tests.tiny_models import write_tiny, write_tiny_bert

MEMORY_BOUND = 256 * 2**20  # bytes one header may make the parser allocate


@dataclass(repr=False)
class Seed:
    """A file to mutate: its bytes (the header only when `sparse`), the positions of its
    u64 and u32 fields, and how far its header goes."""

    name: str
    data: bytes
    size: int  # of the whole file (larger than `data` when sparse)
    header_end: int
    u64_at: list[int]
    u32_at: list[int]
    sparse: bool  # the real file's header with zeros for data: parse, do not load

    def __repr__(self) -> str:
        return f"Seed({self.name})"


def _field_positions(path) -> tuple[list[int], list[int], int]:
    """Offsets of the scalar u64 fields (lengths, counts, dims, tensor offsets) and u32 fields
    (value types, n_dims, quant types) of a file's header, as GGUFReader finds them."""
    reader = GGUFReader(path)
    base = reader.data.ctypes.data
    u64, u32 = [], []
    fields = [f for k, f in reader.fields.items()] + [t.field for t in reader.tensors]
    for f in fields:
        parts = f.parts if len(f.parts) <= 12 else f.parts[:8] + f.parts[-2:]
        for part in parts:
            at = part.ctypes.data - base
            if part.dtype.itemsize == 8 and part.size <= 4:  # a length, count, offset or dims
                u64.extend(at + 8 * k for k in range(part.size))
            elif part.dtype.itemsize == 4 and part.size == 1:
                u32.append(at)
    return sorted(set(u64)), sorted(set(u32)), reader.data_offset


def _seed(name: str, path: Path, sparse: bool) -> Seed:
    u64, u32, header_end = _field_positions(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        data = f.read(header_end if sparse else size)
    return Seed(name, data, size, header_end, u64, u32, sparse)


@pytest.fixture(scope="module")
def tiny_seeds(tmp_path_factory):
    d = tmp_path_factory.mktemp("seeds")
    files = {
        "llama-q8": write_tiny(d / "llama.gguf"),
        "llama-q4_0": write_tiny(d / "llama-q4_0.gguf", qtype=GGMLQuantizationType.Q4_0,
                                 n_layers=1),
        "gemma3": write_tiny(d / "gemma3.gguf", arch="gemma3"),
        "bert": write_tiny_bert(d / "bert.gguf"),
    }
    return [_seed(name, Path(p), sparse=False) for name, p in files.items()]


@pytest.fixture(scope="module")
def real_seeds():
    return [_seed(key, Path(model_path(key)), sparse=True) for key in ("smollm2", "minilm")]


# --- mutations ---------------------------------------------------------------------------------

U64_VALUES = [0, 1, 7, 31, 32, 2**16, 2**31, 2**32, 2**40, 2**62, 2**63, 2**64 - 32, 2**64 - 1]
U32_VALUES = [*range(14), 99, 2**31, 2**32 - 1]


@st.composite
def mutations(draw, seed: Seed):
    """A list of (kind, args) edits for `seed`."""
    n = draw(st.integers(1, 4))
    out = []
    for _ in range(n):
        kind = draw(st.sampled_from(["u64", "u64", "u64", "u32", "u32", "flip", "flip",
                                     "copy64", "truncate", "insert", "cut"]))
        region = seed.header_end if seed.sparse else len(seed.data)
        if kind == "u64":
            at = draw(st.sampled_from(seed.u64_at))
            value = draw(st.one_of(st.sampled_from(U64_VALUES + [seed.size, seed.size - 1]),
                                   st.integers(0, 2**64 - 1),
                                   st.sampled_from([-64, -33, -32, -1, 1, 2, 32, 33, 64])
                                   .map(lambda d: ("delta", d))))
            out.append(("u64", at, value))
        elif kind == "u32":
            at = draw(st.sampled_from(seed.u32_at))
            out.append(("u32", at, draw(st.one_of(st.sampled_from(U32_VALUES),
                                                  st.integers(0, 2**32 - 1)))))
        elif kind == "copy64":  # another field's value: overlaps, swapped dims, shared offsets
            out.append(("copy64", draw(st.sampled_from(seed.u64_at)),
                        draw(st.sampled_from(seed.u64_at))))
        elif kind == "flip":
            at = draw(st.integers(0, min(region, len(seed.data)) - 1))
            out.append(("flip", at, draw(st.integers(0, 7))))
        elif kind == "truncate":
            out.append(("truncate", draw(st.one_of(st.integers(0, seed.header_end + 64),
                                                   st.integers(0, seed.size - 1)))))
        elif kind == "insert":
            out.append(("insert", draw(st.integers(0, region)),
                        draw(st.binary(min_size=1, max_size=16))))
        else:
            out.append(("cut", draw(st.integers(0, region - 1)), draw(st.integers(1, 16))))
    return out


def apply(seed: Seed, edits, path: Path) -> Path:
    """Write `seed` with `edits` applied to `path` (a sparse tail for header-only seeds)."""
    data, size = bytearray(seed.data), seed.size
    for edit in edits:
        kind = edit[0]
        if kind in ("u64", "u32", "copy64"):
            at = edit[1]
            fmt = "<I" if kind == "u32" else "<Q"
            if at + struct.calcsize(fmt) > len(data):
                continue  # an earlier cut moved the field away
            if kind == "copy64":
                if edit[2] + 8 > len(data):
                    continue
                value = struct.unpack_from("<Q", data, edit[2])[0]
            elif isinstance(edit[2], tuple):
                value = (struct.unpack_from(fmt, data, at)[0] + edit[2][1]) % 2**64
            else:
                value = edit[2]
            struct.pack_into(fmt, data, at, value % (2**32 if kind == "u32" else 2**64))
        elif kind == "flip" and edit[1] < len(data):
            data[edit[1]] ^= 1 << edit[2]
        elif kind == "truncate":
            size = min(size, edit[1])
        elif kind == "insert":
            data[edit[1]:edit[1]] = edit[2]
            size += len(edit[2])
        elif kind == "cut":
            del data[edit[1]:edit[1] + edit[2]]
            size -= min(edit[2], max(0, len(data) - edit[1]))
    with open(path, "wb") as f:
        f.write(data[:size])
        if seed.sparse and size > len(data):
            f.truncate(size)
    return path


# --- what must hold ----------------------------------------------------------------------------


def parse_bounded(path: Path):
    """open_gguf, with its peak allocation held to MEMORY_BOUND."""
    tracemalloc.start()
    try:
        return open_gguf(path)
    finally:
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        assert peak < MEMORY_BOUND, f"parsing allocated {peak / 2**20:.0f} MB"


def check_header(gf) -> None:
    """What a load checks before any weight is read: tokenizer, args, every tensor's shape."""
    try:
        Tokenizer.from_metadata(gf.metadata)
    except TokenizerError as e:
        raise GGUFError(f"{gf.path}: {e}") from None
    module = architecture_module(gf.architecture, gf.path)
    gf.check_shapes(module.Model.tensor_shapes(module.ModelArgs.from_gguf(gf)))


def load_and_run(gf) -> None:
    """A full load on the reference backend, one forward pass, a tokenizer round."""
    llm = engine.LLM(gf, backend="reference")
    text = llm.tokenizer.decode(llm.tokenizer.encode("ab a b", add_bos=False))
    assert isinstance(text, str)
    if "completion" in llm.capabilities:
        assert llm.logits([0]).shape == (1, llm.n_vocab)
    else:
        assert llm.embed([[0]]).shape == (1, llm.dim)


def loads_or_refuses(path: Path, full: bool) -> str:
    """Parse (and load, when `full`) the file: 'ok', or 'refused' with one clean GGUFError.
    Anything else raised fails the test with the mutation that caused it."""
    try:
        gf = parse_bounded(path)
        check_header(gf)
        if full:
            load_and_run(gf)
        event("loaded")
        return "ok"
    except GGUFError as e:
        message = str(e)
        assert str(path) in message, message
        assert "\n" not in message and "\r" not in message, message
        event("refused: " + _kind(message[len(str(path)) + 2:]))
        return "refused"


def _kind(message: str) -> str:
    """The fault an error names, without its numbers: for the statistics of a fuzz run."""
    words = [w for w in message.split()[:6] if not any(c.isdigit() for c in w)]
    return " ".join(words[:4])


@fuzz_settings(small=300, fuzz_examples=6_000)
@given(data=st.data())
def test_mutated_tiny_models_load_or_refuse(tiny_seeds, tmp_path, data):
    seed = data.draw(st.sampled_from(tiny_seeds), label="seed")
    edits = data.draw(mutations(seed), label="edits")
    loads_or_refuses(apply(seed, edits, tmp_path / f"{seed.name}.gguf"), full=True)


@fuzz_settings(small=20, fuzz_examples=1_000)
@given(data=st.data())
def test_mutated_real_headers_parse_or_refuse(real_seeds, tmp_path, data):
    seed = data.draw(st.sampled_from(real_seeds), label="seed")
    edits = data.draw(mutations(seed), label="edits")
    loads_or_refuses(apply(seed, edits, tmp_path / f"{seed.name}.gguf"), full=False)


@fuzz_settings(small=40, fuzz_examples=1_500)
@given(data=st.data())
def test_registry_adds_or_refuses_mutated_files(tiny_seeds, tmp_path_factory, data):
    """`model add` (referenced or copied) registers a file that opens, refuses one that does
    not with a GGUFError or RegistryError, and never registers a file it refused."""
    root = tmp_path_factory.mktemp("cache")
    seed = data.draw(st.sampled_from(tiny_seeds), label="seed")
    path = apply(seed, data.draw(mutations(seed), label="edits"), root / "src.gguf")
    registry = Registry(root / "home", fetch_wheel=None)
    copy = data.draw(st.booleans(), label="copy")
    try:
        entry = registry.add(str(path), copy=copy)
    except (GGUFError, RegistryError) as e:
        assert "\n" not in str(e)
        assert registry.list_entries() == []
        assert not list((root / "home").glob("models/*"))
        return
    assert [e.id for e in registry.list_entries()] == [entry.id]
    open_gguf(entry.path)
    shutil.rmtree(root)


MANIFEST_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                max_size=4),
    max_leaves=12)


@fuzz_settings(small=60, fuzz_examples=1_500)
@given(data=st.data())
def test_damaged_manifest_is_one_registry_error(tmp_path_factory, data):
    """A manifest.json edited by hand, half written by another tool or plain garbage: every
    registry read answers or raises RegistryError / ModelNotFoundError, nothing else."""
    root = tmp_path_factory.mktemp("manifest")
    good = {"version": 1, "models": {"m": {
        "id": "m", "name": "M", "path": str(root / "m.gguf"), "size": 1, "sha256": "0" * 64,
        "architecture": "llama", "quant_mix": {"F32": 1}, "parameter_count": 1,
        "context_length": 8, "source": "x", "added": "2026-01-01", "stored": "reference"}}}
    choice = data.draw(st.sampled_from(["garbage", "value", "entry-field"]), label="how")
    import json
    if choice == "garbage":
        text = data.draw(st.binary(max_size=200), label="bytes")
        (root / "manifest.json").write_bytes(text)
    else:
        doc = json.loads(json.dumps(good))
        if choice == "value":
            doc[data.draw(st.sampled_from(["version", "models"]))] = data.draw(MANIFEST_VALUES)
        else:
            field = data.draw(st.sampled_from(sorted(good["models"]["m"]) + ["extra"]))
            doc["models"]["m"][field] = data.draw(MANIFEST_VALUES)
        (root / "manifest.json").write_text(json.dumps(doc))
    registry = Registry(root, fetch_wheel=None)
    from engine.errors import ModelNotFoundError
    for call in (registry.list_entries, lambda: registry.find("m"),
                 lambda: registry.resolve("m"), lambda: registry.find("m.gguf")):
        try:
            call()
        except (RegistryError, ModelNotFoundError) as e:
            assert "\n" not in str(e)
