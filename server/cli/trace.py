"""`numbalm inspect`: a prompt's forward pass on the terminal, as a logit-lens table.

    numbalm inspect -m smollm2 "The capital of France is"
    numbalm inspect "The capital of France is" --generate 4 --json > trace.json

Rows are layers, columns positions; each cell is what the residual stream after that layer
would predict next there (the top token and its probability), coloured by probability when
the terminal allows (not with NO_COLOR set or when piped), in green where that guess is the
token that really came next. `--json` prints the whole trace (`engine.trace.Trace.to_json`).
A model's metadata and tensors are `numbalm model inspect`'s, not this command's.
"""

from __future__ import annotations

import json
import os
import shutil
import sys

from engine.errors import EngineError
from engine.trace import Steer, softmax
from server.cli.generate import _env

CELL = 13  # characters per column: a token of up to 7 characters and " 0.00"
LABEL = 9  # the row labels ("layer 29")


def add_parser(sub) -> None:
    p = sub.add_parser(
        "inspect", help="trace a prompt layer by layer: the logit lens (see docs/inspect.md)",
        description="Trace a prompt through the model layer by layer and print the logit "
                    "lens. For a model file's metadata and tensors, see `numbalm model inspect`.")
    from engine.backends import BACKENDS
    from engine.registry import DEFAULT_MODEL

    p.add_argument("-m", "--model", default=_env("MODEL", DEFAULT_MODEL),
                   help="registry id, alias or .gguf path (env NUMBALM_MODEL)")
    p.add_argument("--backend", choices=BACKENDS, default=_env("BACKEND", None),
                   help="fast (default) or reference (env NUMBALM_BACKEND)")
    p.add_argument("prompt", help="the text to trace")
    p.add_argument("--chat", action="store_true",
                   help="wrap the prompt as one user message in the chat template")
    p.add_argument("--generate", type=int, default=0, metavar="N",
                   help="generate N tokens (greedy) and trace them with the prompt")
    p.add_argument("--top-k", type=int, default=5, help="tokens per lens cell in --json")
    p.add_argument("--positions", type=int, default=None, metavar="N",
                   help="show the last N positions (default: as many as the terminal fits)")
    p.add_argument("--json", action="store_true", help="print the whole trace as JSON")
    p.add_argument("--no-attention", action="store_true",
                   help="leave the attention weights out of --json")
    p.add_argument("--attention-layer", type=int, action="append", dest="attention_layers",
                   metavar="L", help="record attention for layer L only (repeatable)")
    p.add_argument("--ablate-head", action="append", default=[], metavar="L:H",
                   help="zero head H of layer L (repeatable)")
    p.add_argument("--ablate-mlp", type=int, action="append", default=[], metavar="L",
                   help="zero the MLP output of layer L (repeatable)")
    p.add_argument("--steer", action="append", default=[], metavar="L:SCALE:TEXT[:MINUS]",
                   help="add SCALE x (residual of TEXT - residual of MINUS) after layer L")
    p.set_defaults(func=cmd_inspect)


def cmd_inspect(args) -> int:
    import engine

    model = engine.load_model(args.model, backend=args.backend)
    prompt = [{"role": "user", "content": args.prompt}] if args.chat else args.prompt
    tr = model.trace(prompt, top_k=args.top_k, generate=args.generate,
                     attention=args.json and not args.no_attention,
                     attention_layers=args.attention_layers,
                     ablate_heads=[_pair(s) for s in args.ablate_head],
                     ablate_mlp=args.ablate_mlp, steer=[_steer(s) for s in args.steer])
    if args.json:
        json.dump(tr.to_json(), sys.stdout, ensure_ascii=False)
        sys.stdout.write("\n")
        return 0
    color = sys.stdout.isatty() and not os.environ.get("NO_COLOR")
    width = shutil.get_terminal_size((120, 24)).columns
    print_lens(tr, color, width, args.positions)
    return 0


def _pair(text: str) -> tuple[int, int]:
    try:
        layer, head = text.split(":")
        return int(layer), int(head)
    except ValueError:
        raise EngineError(f"--ablate-head takes LAYER:HEAD, not {text!r}") from None


def _steer(text: str) -> Steer:
    parts = text.split(":", 3)
    try:
        layer, scale = int(parts[0]), float(parts[1])
        positive = parts[2]
    except (ValueError, IndexError):
        raise EngineError(f"--steer takes LAYER:SCALE:TEXT[:MINUS], not {text!r}") from None
    return Steer(layer, scale=scale, positive=positive,
                 negative=parts[3] if len(parts) > 3 else None)


def show(piece: str, width: int) -> str:
    """A token piece as the table shows it: spaces as '·', escapes for control characters."""
    s = piece.replace(" ", "·").replace("\n", "\\n").replace("\t", "\\t")
    s = "".join(c if c.isprintable() else f"\\x{ord(c):02x}" for c in s)
    return s if len(s) <= width else s[: width - 1] + "…"


def _paint(text: str, prob: float, hit: bool, color: bool) -> str:
    if not color:
        return text
    shade = 232 + min(23, int(prob * 20))  # grey ramp: darker is less likely
    light = prob > 0.6  # the background is light: dark text on it
    fg = ("1;38;5;22" if light else "1;38;5;46") if hit else ("30" if light else "37")
    return f"\x1b[{fg};48;5;{shade}m{text}\x1b[0m"


def print_lens(tr, color: bool, width: int, positions: int | None = None, out=None) -> None:
    out = out or sys.stdout
    n = len(tr.ids)
    fit = max(1, (width - LABEL) // CELL)
    shown = list(range(max(0, n - (positions or fit)), n))
    lens = tr.logit_lens
    out.write(f"{tr.model} ({tr.backend}), {tr.n_layers} layers, {n} positions; a cell: "
              "that layer's top next-token guess\n")
    if len(shown) < n:
        out.write(f"(the last {len(shown)} positions; --positions N for more)\n")
    out.write(" " * LABEL + "".join(f"{show(tr.tokens[t], CELL - 1):<{CELL}}"
                                    for t in shown) + "\n")
    out.write(f"{'next':<{LABEL}}" + "".join(
        f"{show(tr.vocab.get(int(lens.targets[t]), '?'), CELL - 1):<{CELL}}" for t in shown)
        + "\n")
    for layer in range(tr.n_layers - 1, -1, -1):
        cells = []
        for t in shown:
            top, prob = int(lens.top_ids[layer, t, 0]), float(lens.top_probs[layer, t, 0])
            text = f"{show(tr.vocab[top], CELL - 6):<{CELL - 6}} {prob:.2f}"
            cells.append(_paint(text, prob, top == lens.targets[t], color) + " ")
        out.write(f"layer {layer:<3}" + "".join(cells) + "\n")
    if tr.intervened_logits is not None:
        _print_intervention(tr, out)


def _print_intervention(tr, out) -> None:
    clean, changed = softmax(tr.logits[-1:])[0], softmax(tr.intervened_logits[-1:])[0]
    out.write(f"\nnext token after the last position, clean -> with {_describe(tr)}:\n")
    for p in (clean, changed):
        top = p.argsort()[::-1][:5]
        out.write("  " + "  ".join(f"{show(tr._piece(int(i)), 12)} {p[i]:.3f}" for i in top)
                  + "\n")


def _describe(tr) -> str:
    given = tr.interventions
    parts = [f"head {layer}:{h} zeroed" for layer, h in given["ablate_heads"]]
    parts += [f"attention {layer} zeroed" for layer in given["ablate_attn"]]
    parts += [f"MLP {layer} zeroed" for layer in given["ablate_mlp"]]
    parts += [f"steering after layer {s['layer']} (|v| = {s['norm']:.1f})"
              for s in given["steer"]]
    return ", ".join(parts)
