"""`numbalm convert SRC_DIR OUT.gguf`: a BERT sentence-transformers folder or a Hugging Face
decoder checkpoint (Llama, Mistral, Qwen2/3, Phi-3, Gemma 2) → GGUF.

The conversion itself is `engine.convert.convert`; its errors are `EngineError`s, printed on
one line by `server.cli`.
"""

from __future__ import annotations

from engine.convert import OUTTYPES, convert
from engine.convert_decoder import OUTTYPES as DECODER_OUTTYPES

DESCRIPTION = """\
Convert a BERT-family sentence-transformers model folder (config.json, vocab.txt,
model.safetensors, 1_Pooling/config.json), or a Hugging Face decoder checkpoint (config.json
naming LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM,
Phi3ForCausalLM or Gemma2ForCausalLM; model.safetensors in F32, F16 or BF16; tokenizer.json),
into a GGUF file that numbalm and llama.cpp load. 1-D tensors (norms, biases) stay F32 with
--outtype f16, as in llama.cpp; bf16 and q8_0 are for decoders."""


def add_parser(subparsers) -> None:
    """Add `convert` to the top-level CLI."""
    p = subparsers.add_parser("convert", help="convert a BERT sentence-transformers folder or "
                                              "a Hugging Face decoder to GGUF",
                              description=DESCRIPTION)
    p.add_argument("src", metavar="SRC_DIR", help="the model folder")
    p.add_argument("out", metavar="OUT.gguf", help="the GGUF file to write")
    p.add_argument("--outtype", choices=sorted({*OUTTYPES, *DECODER_OUTTYPES}), default="f32",
                   help="type of the 2-D weight matrices (default: f32)")
    p.add_argument("--name", help="general.name in the file (default: the folder's name)")
    p.set_defaults(func=cmd_convert)


def cmd_convert(args) -> int:
    path = convert(args.src, args.out, outtype=args.outtype, name=args.name)
    print(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB, {args.outtype})")
    return 0
