"""model.trace(): the logit lens, norms, attention weights and interventions, on both backends."""

from __future__ import annotations

import numpy as np
import pytest

from engine.errors import TraceError
from engine.trace import MAX_ATTENTION_WEIGHTS, Steer, softmax, top_k
from tests.helpers import load_data

PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def paris(smollm2_fast):
    return smollm2_fast.trace(PROMPT)


@pytest.fixture(scope="module")
def paris_ref(smollm2_ref):
    return smollm2_ref.trace(PROMPT)


def test_tokens_and_logits_are_the_models(paris, smollm2_fast):
    ids = smollm2_fast.tokenizer.encode(PROMPT, add_bos=None, special=True)
    assert paris.ids == ids and paris.n_prompt == len(ids)
    assert "".join(paris.tokens) == PROMPT
    # the trace's matmuls are exact, generation's round activations to 15 bits
    np.testing.assert_allclose(paris.logits, smollm2_fast.logits(ids), atol=2e-2)
    with smollm2_fast.backend.exact():  # on this thread: no other pass runs in these tests
        np.testing.assert_array_equal(paris.logits, smollm2_fast.logits(ids))


@pytest.mark.parametrize("which", ["paris", "paris_ref"])
def test_the_last_layer_of_the_lens_is_the_models_output(which, request):
    tr = request.getfixturevalue(which)
    k = tr.logit_lens.top_ids.shape[-1]
    probs = softmax(tr.logits)
    want = np.argsort(-tr.logits, axis=1, kind="stable")[:, :k]  # ties: lower id first
    np.testing.assert_array_equal(tr.logit_lens.top_ids[-1], want)
    np.testing.assert_allclose(tr.logit_lens.top_probs[-1],
                               np.take_along_axis(probs, want, axis=1), atol=1e-5)
    rows = np.arange(len(tr.ids))
    np.testing.assert_allclose(tr.logit_lens.target_prob[-1], probs[rows, tr.logit_lens.targets],
                               atol=1e-5)
    assert tr.logit_lens.targets.tolist() == tr.ids[1:] + [int(want[-1, 0])]
    assert tr.logit_lens.target_rank[-1, -1] == 1


def test_paris_becomes_the_top_guess_in_the_last_layers(paris):
    paris_id = paris.logit_lens.targets[-1]
    assert paris.vocab[int(paris_id)] == " Paris"
    ranks = paris.logit_lens.target_rank[:, -1]  # (L,) the rank of " Paris" after each layer
    assert ranks[0] > 100 and ranks[-1] == 1


def test_attention_rows_are_causal_distributions(paris):
    n = len(paris.ids)
    assert sorted(paris.attention) == list(range(paris.n_layers))
    for w in paris.attention.values():
        assert w.shape == (paris.n_heads, n, n)  # (heads, query positions, keys)
        np.testing.assert_allclose(w.sum(axis=-1), 1.0, atol=1e-5)
        assert np.all(w >= 0) and np.all(np.triu(np.ones((n, n)), 1)[None] * w == 0)


def test_norms_are_recorded_per_layer_and_position(paris):
    n = len(paris.ids)
    for name in ("resid", "attn", "mlp"):
        assert paris.norms[name].shape == (paris.n_layers, n)
        assert np.all(paris.norms[name] > 0)
    np.testing.assert_allclose(paris.norms["resid"],
                               np.linalg.norm(paris.residuals, axis=-1), rtol=1e-5)


def test_chosen_layers_heads_and_positions(smollm2_fast):
    tr = smollm2_fast.trace(PROMPT, attention_layers=[3, -1], attention_heads=[0, 2],
                            attention_positions=[-1])
    n = len(tr.ids)
    assert sorted(tr.attention) == [3, tr.n_layers - 1]
    assert tr.attention_heads == [0, 2] and tr.attention_positions == [n - 1]
    assert tr.attention[3].shape == (2, 1, n)
    full = smollm2_fast.trace(PROMPT, attention_layers=[3])
    np.testing.assert_allclose(tr.attention[3][:, 0], full.attention[3][[0, 2], n - 1],
                               atol=1e-6)  # BLAS sums one query row as it likes


# A traced pass runs the fast backend's matmuls exactly (FastBackend.exact: 22-bit activations,
# the K-quant scales' float16 residual added back), so the traces differ by float32 rounding
# only. Measured over these prompts: attention weights 7.5e-6 (SmolLM2) and 3.9e-6 (Gemma 3),
# residual norms 5.6e-6 and 1.8e-6 relative, every lens top-1 the same (with generation's
# 15-bit activations and float16 scales: 7.5e-4 and 1.7e-3, and one Gemma 3 top-1 flipped).
ATTENTION_ATOL = 1e-4
RESID_RTOL = 5e-5


@pytest.mark.parametrize("key", ["smollm2", pytest.param("gemma3", marks=pytest.mark.slow)])
def test_fast_trace_matches_the_reference(key, request):
    ref, fast = request.getfixturevalue(f"{key}_ref"), request.getfixturevalue(f"{key}_fast")
    for p in load_data(f"{key}.prompts.json")["prompts"]:
        a, b = fast.trace(p["ids"]), ref.trace(p["ids"])
        assert sorted(a.attention) == sorted(b.attention)
        for layer in a.attention:
            np.testing.assert_allclose(a.attention[layer], b.attention[layer],
                                       atol=ATTENTION_ATOL,
                                       err_msg=f"{p['prompt']!r} layer {layer}")
        # every layer's guess at every position; the closest call, a lens logit gap of 6e-4
        # (Gemma 3, the chat prompt, layer 8), is 11x the backends' lens logits' difference
        np.testing.assert_array_equal(a.logit_lens.top_ids[..., 0], b.logit_lens.top_ids[..., 0],
                                      err_msg=p["prompt"])
        np.testing.assert_allclose(a.norms["resid"], b.norms["resid"], rtol=RESID_RTOL)


def test_only_traced_passes_are_exact(smollm2_fast, monkeypatch):
    """Generation keeps the backend's 15-bit activations: the exact mode is on only inside
    the trace's passes, and off again when one raises."""
    from kernels import qmatmul

    backend = smollm2_fast.backend
    assert backend.act_terms == qmatmul.TERMS == 2 and not backend.exact_mode
    seen = []  # the terms of every quantized matmul
    real = qmatmul.matmul

    def spy(x, w, out=None, isa=None, terms=qmatmul.TERMS):
        if w.data is not None:
            seen.append(terms)
        return real(x, w, out, isa, terms)

    monkeypatch.setattr(qmatmul, "matmul", spy)
    tr = smollm2_fast.trace(PROMPT, attention=False, generate=2)
    assert set(seen) == {2, qmatmul.EXACT_TERMS}  # generating the 2 tokens, then the trace
    assert not backend.exact_mode
    seen.clear()
    smollm2_fast.logits(tr.ids)
    assert set(seen) == {2}

    def boom(*args):
        raise RuntimeError("boom")

    monkeypatch.setattr(smollm2_fast.model, "final_norm", boom)  # the lens, inside exact()
    with pytest.raises(RuntimeError, match="boom"):
        smollm2_fast.trace(PROMPT, attention=False)
    assert not backend.exact_mode


def test_the_fast_backends_exact_matmuls_are_the_references():
    """FastBackend.exact(), the hook traced passes use: `linear` and `linear_many` (stacked or
    not) with K-quants too, against the reference backend's float32 product."""
    from gguf.constants import GGMLQuantizationType as Q

    from engine.backends.fast import FastBackend
    from engine.backends.reference import ReferenceBackend
    from engine.gguf_file import TensorInfo
    from kernels.testing import random_tensor

    fast, ref = FastBackend(), ReferenceBackend()

    def tensor(qtype, shape, seed):
        raw = random_tensor(qtype, shape, seed)
        return TensorInfo("w", shape, qtype, raw.size, raw)

    x = np.random.default_rng(0).standard_normal((5, 256)).astype(np.float32)
    stacked = [tensor(Q.Q4_K, (32, 256), 1), tensor(Q.Q4_K, (20, 256), 2)]
    mixed = [tensor(Q.Q6_K, (16, 256), 3), tensor(Q.Q5_0, (16, 256), 4)]
    for ts in (stacked, mixed):
        fused = fast.prepare_many(ts)
        assert (fused.stacked is None) == (ts is mixed)
        with fast.exact():
            ys = fast.linear_many(x, fused)
            y0 = fast.linear(x, fast.prepare(ts[0]))
        for y, t in zip([y0, *ys], [ts[0], *ts], strict=True):
            W = ref.prepare(t)
            np.testing.assert_array_less(np.abs(y - ref.linear(x, W)),
                                         1e-6 * (np.abs(x) @ np.abs(W).T))
    assert not fast.exact_mode
    W = ref.prepare(stacked[0])  # outside: generation's rounding, float16 scales (~1e-4)
    assert np.abs(fast.linear(x, fast.prepare(stacked[0])) - ref.linear(x, W)).max() > 1e-5


def test_gemma3_traces_its_sliding_window_layers(gemma3_fast):
    tr = gemma3_fast.trace("The capital of France is", attention_layers=[0, 5])
    with gemma3_fast.backend.exact():
        np.testing.assert_array_equal(tr.logits, gemma3_fast.logits(tr.ids))
    np.testing.assert_array_equal(tr.logit_lens.top_ids[-1, :, 0], np.argmax(tr.logits, axis=1))
    for w in tr.attention.values():
        np.testing.assert_allclose(w.sum(axis=-1), 1.0, atol=1e-5)


def test_ablating_a_head_is_zeroing_its_slice_of_the_output_projection(smollm2_ref):
    """The reference backend's weights are plain float32 arrays: zeroing head h's columns of
    attn_output is what ablating the head means, computed another way."""
    layer, head = 4, 3
    tr = smollm2_ref.trace(PROMPT, ablate_heads=[(layer, head)], attention=False)
    assert tr.interventions["ablate_heads"] == [[layer, head]]
    w = smollm2_ref.model.layers[layer].attn_output  # (dim, n_heads * head_dim)
    hd = smollm2_ref.args.head_dim
    saved = w[:, head * hd:(head + 1) * hd].copy()
    try:
        w[:, head * hd:(head + 1) * hd] = 0.0
        want = smollm2_ref.logits(tr.ids)
    finally:
        w[:, head * hd:(head + 1) * hd] = saved
    np.testing.assert_allclose(tr.intervened_logits, want, rtol=1e-5, atol=1e-4)
    assert np.abs(tr.intervened_logits - tr.logits).max() > 1e-2  # it did change something


def test_the_fast_backend_ablates_as_the_reference_does(smollm2_fast, smollm2_ref):
    options = {"ablate_heads": [(4, 3), (10, 0)], "ablate_mlp": [2], "attention": False}
    a, b = smollm2_fast.trace(PROMPT, **options), smollm2_ref.trace(PROMPT, **options)
    change_a, change_b = a.intervened_logits - a.logits, b.intervened_logits - b.logits
    assert np.abs(change_b).max() > 0.1
    # the two backends differ by ~1e-3 in a logit; the change itself agrees as closely
    np.testing.assert_allclose(change_a, change_b, atol=0.02 * np.abs(change_b).max())
    assert np.array_equal(np.argmax(a.intervened_logits, 1), np.argmax(b.intervened_logits, 1))


def test_a_steering_vector_shifts_the_next_token(smollm2_fast):
    """The residual difference between an English and a French prompt, added after a middle
    layer, moves the answer from Paris towards London."""
    tok = smollm2_fast.tokenizer
    paris, london = tok.encode(" Paris")[0], tok.encode(" London")[0]
    steer = Steer(layer=14, positive="The capital of England is",
                  negative="The capital of France is", scale=4.0)
    tr = smollm2_fast.trace(PROMPT, steer=[steer], attention=False)
    before, after = softmax(tr.logits[-1:])[0], softmax(tr.intervened_logits[-1:])[0]
    assert after[london] > 3 * before[london]  # measured: 0.0125 -> 0.075
    assert after[paris] < 0.8 * before[paris]  # 0.77 -> 0.46
    assert tr.interventions["steer"][0]["norm"] > 0
    # an explicit vector does the same as the texts it came from
    vector = (smollm2_fast.trace("The capital of England is").residuals[14, -1]
              - smollm2_fast.trace(PROMPT).residuals[14, -1])
    same = smollm2_fast.trace(PROMPT, steer=[Steer(14, vector, 4.0)], attention=False)
    np.testing.assert_allclose(same.intervened_logits, tr.intervened_logits, atol=1e-4)


def test_generated_tokens_are_traced(smollm2_fast):
    ids = smollm2_fast.tokenizer.encode(PROMPT)
    want = [t.id for t in smollm2_fast.generate(ids, max_tokens=4, temperature=0.0)]
    tr = smollm2_fast.trace(ids, generate=4, attention_positions=[-1])
    assert tr.ids == ids + want and tr.n_prompt == len(ids)
    assert tr.logit_lens.targets.tolist()[len(ids) - 1:-1] == want
    assert tr.attention_positions == [len(tr.ids) - 1]
    js = tr.to_json()
    assert [t["generated"] for t in js["tokens"]] == [False] * len(ids) + [True] * 4


def test_chat_messages_are_traced(smollm2_fast):
    messages = [{"role": "user", "content": "Hi"}]
    tr = smollm2_fast.trace(messages, attention=False)
    assert tr.ids == smollm2_fast.chat_prompt_ids(messages)


def test_an_oversized_attention_request_names_the_option(smollm2_fast):
    long = " ".join(["word"] * 120)  # 30 layers x 9 heads x 120 x 120 > the limit
    with pytest.raises(TraceError, match="attention_layers") as e:
        smollm2_fast.trace(long)
    assert e.value.option == "attention_layers" and f"{MAX_ATTENTION_WEIGHTS:,}" in str(e.value)
    tr = smollm2_fast.trace(long, attention_layers=[5])  # narrowed, it fits
    assert list(tr.attention) == [5]


@pytest.mark.parametrize("options, option", [
    ({"attention_layers": [30]}, "attention_layers"),
    ({"attention_heads": [-10]}, "attention_heads"),
    ({"ablate_heads": [(0, 9)]}, "ablate_heads"),
    ({"ablate_heads": [3]}, "ablate_heads"),
    ({"ablate_mlp": ["x"]}, "ablate_mlp"),
    ({"steer": [Steer(0, [1.0, 2.0])]}, "steer"),
    ({"steer": [Steer(0)]}, "steer"),
    ({"top_k": 0}, "top_k"),
    ({"generate": 5000}, "generate"),
])
def test_bad_options_name_themselves(smollm2_fast, options, option):
    with pytest.raises(TraceError) as e:
        smollm2_fast.trace(PROMPT, **options)
    assert e.value.option == option


def test_json_is_plain_and_complete(smollm2_fast):
    import json

    tr = smollm2_fast.trace(PROMPT, ablate_heads=[(1, 1)], top_k=3)
    js = json.loads(json.dumps(tr.to_json()))
    n, L = len(tr.ids), tr.n_layers
    assert np.array(js["logit_lens"]["top_ids"]).shape == (L, n, 3)
    assert np.array(js["attention"]["weights"]).shape == (L, tr.n_heads, n, n)
    assert np.array(js["intervention"]["top_ids"]).shape == (n, 3)
    assert all(str(i) in js["vocab"] for i in np.ravel(js["logit_lens"]["top_ids"]))
    assert all(str(i) in js["vocab"] for i in np.ravel(js["intervention"]["top_ids"]))


def test_top_k_orders_by_logit_then_id():
    logits = np.array([[1.0, 3.0, 3.0, 0.5, 2.0]], np.float32)
    ids, probs = top_k(logits, 3)
    assert ids.tolist() == [[1, 2, 4]]
    np.testing.assert_allclose(probs, softmax(logits)[:, [1, 2, 4]], rtol=1e-6)
