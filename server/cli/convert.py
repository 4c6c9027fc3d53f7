"""`numbalm convert SRC_DIR OUT.gguf`: a BERT sentence-transformers folder → GGUF.

The conversion itself is `engine.convert.convert`; its errors are `EngineError`s, printed on
one line by `server.cli`.
"""

from __future__ import annotations

from engine.convert import OUTTYPES, convert

DESCRIPTION = """\
Convert a BERT-family sentence-transformers model folder (config.json, vocab.txt,
model.safetensors, 1_Pooling/config.json) into a GGUF file that numbalm and llama.cpp load.
1-D tensors (norms, biases) stay F32 with --outtype f16, as in llama.cpp."""


def add_parser(subparsers) -> None:
    """Add `convert` to the top-level CLI."""
    p = subparsers.add_parser("convert", help="convert a BERT sentence-transformers folder "
                                              "to GGUF", description=DESCRIPTION)
    p.add_argument("src", metavar="SRC_DIR", help="the model folder")
    p.add_argument("out", metavar="OUT.gguf", help="the GGUF file to write")
    p.add_argument("--outtype", choices=sorted(OUTTYPES), default="f32",
                   help="type of the 2-D weight matrices (default: f32)")
    p.add_argument("--name", help="general.name in the file (default: the folder's name)")
    p.set_defaults(func=cmd_convert)


def cmd_convert(args) -> int:
    path = convert(args.src, args.out, outtype=args.outtype, name=args.name)
    print(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB, {args.outtype})")
    return 0
