"""The assembled SparseWSI model: prompts, splicing, the training loss, gradients through the Soft
Top-K, and the single jitted inference path (equal to the pieces run by hand, no training pieces)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sparsewsi.llm import SamplingConfig, build_tiny_tokenizer, generate, stop_token_ids, tiny_config
from sparsewsi.model import (SparseWSI, SparseWSIConfig, SparseWSIPredictor, check_batch, encode_chats,
                             image_token_id, infer_jit, splice)
from sparsewsi.selection import gather_tokens, hard_topk
from sparsewsi.selection.sparselearn import standardize_tokens
from sparsewsi.training import stack, synthetic_examples


@pytest.fixture(scope="module")
def tok():
    return build_tiny_tokenizer()


@pytest.fixture(scope="module")
def model(tok):
    cfg = SparseWSIConfig(feature_dim=16, llm=tiny_config(hidden_size=32, intermediate_size=64, num_hidden_layers=1),
                          image_token_id=image_token_id(tok), k=4, scorer_hidden=32, projector_hidden=32)
    return SparseWSI(cfg)


@pytest.fixture(scope="module")
def batch(tok):
    ex = synthetic_examples(tok, 3, num_tokens=24, feature_dim=16, evidence_tokens=3, seed=1)
    return {k: v for k, v in stack(ex).items() if k not in ("label",)}


def test_encode_chats_masks_only_the_answer(tok):
    b = encode_chats(tok, ["What grade?", "Describe it."], ["grade two", "normal tissue"])
    image = image_token_id(tok)
    assert ((b["input_ids"] == image).sum(1) == 1).all()
    assert tok.decode(b["input_ids"][0][b["loss_mask"][0] == 1]) == "grade two<|im_end|>"
    assert (b["loss_mask"] <= b["attention_mask"]).all()
    p = encode_chats(tok, ["What grade?", "Describe the slide please."], prompt_only=True)
    assert p["attention_mask"][:, -1].all() and not p["loss_mask"].any()  # left-padded, no targets
    text = tok.decode(p["input_ids"][0][p["attention_mask"][0] == 1])
    assert text.endswith("<|im_start|>assistant\n") and "<image>\nWhat grade?" in text


def test_check_batch_names_the_problem(tok, batch):
    bad = dict(batch, input_ids=np.where(batch["input_ids"] == image_token_id(tok), 5, batch["input_ids"]))
    with pytest.raises(ValueError, match="exactly one"):
        check_batch(bad, image_token_id(tok))
    with pytest.raises(ValueError, match="lacks"):
        check_batch({k: v for k, v in batch.items() if k != "loss_mask"}, image_token_id(tok))


def test_splice_places_visual_tokens_at_the_image_slot():
    ids = jnp.array([[5, 5, 9, 5, 5], [9, 5, 5, 5, 5]])
    text = jnp.broadcast_to(jnp.arange(5.0)[None, :, None], (2, 5, 1))
    vis = -jnp.arange(1.0, 4.0)[None, :, None].repeat(2, 0)
    emb, mask, out = splice(text, ids, jnp.ones((2, 5)), 9, vis, jnp.array([[1, 1, 0], [1, 1, 1]]))
    np.testing.assert_array_equal(emb[0, :, 0], [0, 1, -1, -2, -3, 3, 4])
    np.testing.assert_array_equal(emb[1, :, 0], [-1, -2, -3, 1, 2, 3, 4])
    np.testing.assert_array_equal(mask[0], [1, 1, 1, 1, 0, 1, 1])
    # text token i sits at out[i]; the <image> token maps to the last valid visual slot
    np.testing.assert_array_equal(out, [[0, 1, 3, 5, 6], [2, 3, 4, 5, 6]])


def test_loss_is_plain_answer_cross_entropy(model, batch):
    """The training loss with every token fully selected equals CE on the answers computed from logits."""
    b = {k: jnp.asarray(v) for k, v in batch.items()}
    loss, aux = nnx.jit(lambda m, b: m.training_loss(b, 0, jax.random.key(0)))(model, b)
    assert np.isfinite(loss) and float(aux["answer_tokens"]) == batch["loss_mask"][:, 1:].sum()
    assert abs(float(loss) - np.log(model.config.llm.vocab_size)) < 0.5  # random init: ~uniform


def test_padding_tokens_get_no_score_and_no_mask_mass(model, batch):
    """Extra padded slots (mask False, arbitrary values) change no valid score and get zero Soft Top-K mass."""
    from sparsewsi.selection import soft_topk

    b = {k: jnp.asarray(v) for k, v in batch.items()}
    feats = jnp.pad(b["features"], ((0, 0), (0, 8), (0, 0)), constant_values=7.0)
    fmask = jnp.pad(b["feature_mask"], ((0, 0), (0, 8)))
    scores = nnx.jit(lambda m, x, mask: m.scorer(x, mask))
    s1 = scores(model, b["features"], b["feature_mask"])
    s2 = scores(model, feats, fmask)
    np.testing.assert_allclose(s1, s2[:, :24], atol=1e-5)
    alpha = jax.jit(lambda s, mask: soft_topk(s, 4, 0.5, mask))(s2, fmask)
    assert float(jnp.abs(alpha[:, 24:]).max()) == 0.0
    np.testing.assert_allclose(alpha.sum(-1), 4.0, rtol=1e-4)


def test_gradient_reaches_scorer_through_soft_topk_and_matches_finite_differences(model, batch):
    """The scorer influences the loss only through the Soft Top-K mask: its gradient must be non-zero
    and equal a central finite difference along the gradient direction."""
    b = {k: jnp.asarray(v) for k, v in batch.items()}
    graphdef, scorer_state, rest = nnx.split(model, lambda p, v: p[0] == "scorer" and isinstance(v, nnx.Param), ...)
    key = jax.random.key(7)

    # One compiled program for the gradient and both finite-difference evaluations.
    value_and_grad = jax.jit(jax.value_and_grad(lambda s: nnx.merge(graphdef, s, rest).training_loss(b, 0, key)[0]))
    loss_of = lambda s: value_and_grad(s)[0]  # noqa: E731

    _, grads = value_and_grad(scorer_state)
    norm = np.sqrt(sum(float(jnp.sum(g * g)) for g in jax.tree.leaves(grads)))
    assert norm > 1e-5
    direction = jax.tree.map(lambda g: g / norm, grads)
    eps = 3e-2  # float32 loss: a step large enough to resolve, small enough for O(eps^2) error
    plus = loss_of(jax.tree.map(lambda p, d: p + eps * d, scorer_state, direction))
    minus = loss_of(jax.tree.map(lambda p, d: p - eps * d, scorer_state, direction))
    numeric = float(plus - minus) / (2 * eps)
    np.testing.assert_allclose(numeric, norm, rtol=0.03)


def test_score_noise_perturbs_training_selection_only(model, tok, batch):
    """Gumbel exploration noise (``score_noise``) changes the training loss, deterministically per key,
    leaves score_noise = 0 exactly as before, keeps the scorer's gradient, and never touches inference."""
    from sparsewsi.selection import soft_topk

    b = {k: jnp.asarray(v) for k, v in batch.items()}
    noisy = SparseWSI(model.config.replace(score_noise=1.0), model.llm, rngs=nnx.Rngs(0))
    same = SparseWSI(model.config.replace(score_noise=0.0), model.llm, rngs=nnx.Rngs(0))
    loss = nnx.jit(lambda m, b, key: m.training_loss(b, 0, key)[0])
    key = jax.random.key(3)
    assert float(loss(same, b, key)) == float(loss(model, b, key))
    assert float(loss(noisy, b, key)) == float(loss(noisy, b, key))
    assert float(loss(noisy, b, key)) != float(loss(model, b, key))
    # By hand: Gumbel noise on the standardised scores from the second half of the key, the gate from the first.
    from sparsewsi.model.sparsewsi import answer_loss

    def by_hand(m, b, key):
        mask = b["feature_mask"].astype(bool)
        x = m.input_features(b["features"], mask)
        scores = m.scorer(x, mask)
        gate_key, gumbel_key = jax.random.split(key)
        alpha = soft_topk(scores + jax.random.gumbel(gumbel_key, scores.shape), 4, m.temperature(0), mask)
        h = m.denoiser(m.noise_gate(x, alpha, gate_key), 1.0 - alpha)
        embeds, attn, out_pos = splice(m.llm.embed_tokens(b["input_ids"]), b["input_ids"], b["attention_mask"],
                                       m.config.image_token_id, m.projector(h), mask)
        return answer_loss(m.llm, embeds, attn, out_pos, b["input_ids"], b["loss_mask"])[0]

    np.testing.assert_allclose(float(nnx.jit(by_hand)(noisy, b, key)), float(loss(noisy, b, key)), rtol=1e-5)
    scores = nnx.jit(lambda m, x, mask: m.scores(x, mask))(noisy, b["features"], b["feature_mask"])
    graphdef, scorer_state, rest = nnx.split(noisy, lambda p, v: p[0] == "scorer" and isinstance(v, nnx.Param), ...)
    grads = jax.grad(lambda st: nnx.merge(graphdef, st, rest).training_loss(b, 0, key)[0])(scorer_state)
    assert sum(float(jnp.sum(g * g)) for g in jax.tree.leaves(grads)) > 0
    # Inference is a deterministic Hard Top-K by the unperturbed scores.
    np.testing.assert_array_equal(noisy.select(b["features"], b["feature_mask"]).indices,
                                  hard_topk(scores, 4, b["feature_mask"]).indices)
    with pytest.raises(ValueError, match="score_noise must be >= 0"):
        model.config.replace(score_noise=-1.0)


def test_score_noise_anneals_by_cosine_to_zero(model, batch):
    """``score_noise_steps`` > 0: the Gumbel scale falls from ``score_noise`` by cosine to 0 at that step
    (the loss then equals the noise-free loss exactly); 0 keeps it constant."""
    b = {k: jnp.asarray(v) for k, v in batch.items()}
    annealed = SparseWSI(model.config.replace(score_noise=2.0, score_noise_steps=10), model.llm, rngs=nnx.Rngs(0))
    constant = SparseWSI(model.config.replace(score_noise=2.0), model.llm, rngs=nnx.Rngs(0))
    clean = SparseWSI(model.config.replace(score_noise=0.0), model.llm, rngs=nnx.Rngs(0))
    for step, want in ((0, 2.0), (5, 1.0), (10, 0.0), (20, 0.0)):
        np.testing.assert_allclose(float(annealed.score_noise_scale(step)), want, atol=1e-6)
        assert float(constant.score_noise_scale(step)) == 2.0
    loss = nnx.jit(lambda m, b, step, key: m.training_loss(b, step, key))
    key = jax.random.key(5)
    noisy_loss, aux = loss(annealed, b, 3, key)
    assert float(noisy_loss) != float(loss(clean, b, 3, key)[0])
    np.testing.assert_allclose(float(aux["score_noise"]), 2.0 * 0.5 * (1 + np.cos(np.pi * 0.3)), rtol=1e-6)
    # At the end of the schedule the scores are unperturbed; only the key's split differs, and the gate uses
    # the first half either way, as with score_noise > 0 before.
    by_hand = SparseWSI(model.config.replace(score_noise=1e-30), model.llm, rngs=nnx.Rngs(0))
    np.testing.assert_allclose(float(loss(annealed, b, 10, key)[0]), float(loss(by_hand, b, 10, key)[0]), rtol=1e-6)
    with pytest.raises(ValueError, match="score_noise_steps must be >= 0"):
        model.config.replace(score_noise_steps=-1)


def test_gate_floor_by_hand(model, batch):
    """``gate_floor``: the noise gate and the denoiser see ``alpha + (1 - alpha) * floor(step)``, the
    floor falling linearly to 0 at ``gate_floor_steps``; from then on (and with 0) the loss is the
    plain one; the scorer still gets a gradient; bad values are refused."""
    from sparsewsi.model.sparsewsi import answer_loss
    from sparsewsi.selection import soft_topk

    b = {k: jnp.asarray(v) for k, v in batch.items()}
    floored = SparseWSI(model.config.replace(gate_floor=0.6, gate_floor_steps=10), model.llm, rngs=nnx.Rngs(0))
    loss = nnx.jit(lambda m, b, step, key: m.training_loss(b, step, key)[0])
    key = jax.random.key(5)

    def by_hand(m, b, step, key, floor):
        mask = b["feature_mask"].astype(bool)
        x = m.input_features(b["features"], mask)
        alpha = soft_topk(m.scorer(x, mask), 4, m.temperature(step), mask)
        gate = alpha + (1.0 - alpha) * floor
        h = m.denoiser(m.noise_gate(x, gate, key), 1.0 - gate)
        embeds, attn, out_pos = splice(m.llm.embed_tokens(b["input_ids"]), b["input_ids"], b["attention_mask"],
                                       m.config.image_token_id, m.projector(h), mask)
        return answer_loss(m.llm, embeds, attn, out_pos, b["input_ids"], b["loss_mask"])[0]

    for step, floor in ((0, 0.6), (5, 0.3)):
        np.testing.assert_allclose(float(loss(floored, b, step, key)), float(by_hand(floored, b, step, key, floor)),
                                   rtol=1e-5)
        assert float(loss(floored, b, step, key)) != float(loss(model, b, step, key))
    for step in (10, 40):  # the floor has reached 0: the plain loss
        np.testing.assert_allclose(float(loss(floored, b, step, key)), float(loss(model, b, step, key)), rtol=1e-6)
    graphdef, scorer_state, rest = nnx.split(floored, lambda p, v: p[0] == "scorer" and isinstance(v, nnx.Param), ...)
    grads = jax.grad(lambda st: nnx.merge(graphdef, st, rest).training_loss(b, 0, key)[0])(scorer_state)
    assert sum(float(jnp.sum(g * g)) for g in jax.tree.leaves(grads)) > 0

    # With noise slots, the floor lifts the bag's own tokens only: the slots stay pure noise.
    from sparsewsi.selection.sparselearn import interleave_noise_slots

    both = SparseWSI(model.config.replace(gate_floor=0.6, gate_floor_steps=10, noise_slots=5), model.llm,
                     rngs=nnx.Rngs(0))

    def by_hand_slots(m, b, key):
        mask = b["feature_mask"].astype(bool)
        x = m.input_features(b["features"], mask)
        alpha = soft_topk(m.scorer(x, mask), 4, m.temperature(0), mask)
        gate_key, slot_key = jax.random.split(key)
        x, gate, mask = interleave_noise_slots(x, alpha + (1.0 - alpha) * 0.6, mask, 5, slot_key)
        h = m.denoiser(m.noise_gate(x, gate, gate_key), 1.0 - gate)
        embeds, attn, out_pos = splice(m.llm.embed_tokens(b["input_ids"]), b["input_ids"], b["attention_mask"],
                                       m.config.image_token_id, m.projector(h), mask)
        return answer_loss(m.llm, embeds, attn, out_pos, b["input_ids"], b["loss_mask"])[0]

    np.testing.assert_allclose(float(loss(both, b, 0, key)), float(nnx.jit(by_hand_slots)(both, b, key)), rtol=1e-5)
    with pytest.raises(ValueError, match="gate_floor must be in"):
        model.config.replace(gate_floor=1.0, gate_floor_steps=10)
    with pytest.raises(ValueError, match="gate_floor_steps"):
        model.config.replace(gate_floor=0.5)


def test_noise_slots_by_hand(model, batch):
    """``noise_slots`` inserts pure-noise tokens (gate mask 0) among the bag's tokens in training: the loss
    equals the pieces run by hand with the same keys, 0 is the plain loss, inference is untouched."""
    from sparsewsi.model.sparsewsi import answer_loss
    from sparsewsi.selection import soft_topk
    from sparsewsi.selection.sparselearn import interleave_noise_slots

    b = {k: jnp.asarray(v) for k, v in batch.items()}
    aug = SparseWSI(model.config.replace(noise_slots=7), model.llm, rngs=nnx.Rngs(0))
    off = SparseWSI(model.config.replace(noise_slots=0), model.llm, rngs=nnx.Rngs(0))
    loss = nnx.jit(lambda m, b, key: m.training_loss(b, 0, key))
    key = jax.random.key(5)
    assert float(loss(off, b, key)[0]) == float(loss(model, b, key)[0])

    def by_hand(m, b, key):
        mask = b["feature_mask"].astype(bool)
        x = m.input_features(b["features"], mask)
        alpha = soft_topk(m.scorer(x, mask), 4, m.temperature(0), mask)
        gate_key, slot_key = jax.random.split(key)
        x, alpha, mask = interleave_noise_slots(x, alpha, mask, 7, slot_key)
        h = m.denoiser(m.noise_gate(x, alpha, gate_key), 1.0 - alpha)
        embeds, attn, out_pos = splice(m.llm.embed_tokens(b["input_ids"]), b["input_ids"], b["attention_mask"],
                                       m.config.image_token_id, m.projector(h), mask)
        return answer_loss(m.llm, embeds, attn, out_pos, b["input_ids"], b["loss_mask"])[0]

    got, aux = loss(aug, b, key)
    np.testing.assert_allclose(float(nnx.jit(by_hand)(aug, b, key)), float(got), rtol=1e-5)
    assert float(aux["visual_tokens"]) == b["features"].shape[1] + 7
    assert float(got) != float(loss(off, b, key)[0])
    np.testing.assert_array_equal(aug.select(b["features"], b["feature_mask"]).indices,
                                  model.select(b["features"], b["feature_mask"]).indices)
    with pytest.raises(ValueError, match="noise_slots"):
        model.config.replace(noise_slots=-1)


def test_candidate_cap_keeps_the_top_scored_tokens(model, batch):
    capped = SparseWSI(model.config.replace(candidate_cap=8), model.llm, rngs=nnx.Rngs(0))
    b = {k: jnp.asarray(v) for k, v in batch.items()}
    loss, aux = nnx.jit(lambda m, b: m.training_loss(b, 0, jax.random.key(0)))(capped, b)
    assert np.isfinite(loss) and float(aux["visual_tokens"]) == 8


def test_inference_equals_pieces_by_hand(model, tok, batch):
    feats, fmask = jnp.asarray(batch["features"]), jnp.asarray(batch["feature_mask"])
    prompt = encode_chats(tok, ["What grade?", "Describe the slide.", "Any invasion?"], prompt_only=True)
    sampling = SamplingConfig(max_new_tokens=6, stop_token_ids=stop_token_ids(tok, model.config.llm),
                              pad_token_id=tok.pad_token_id)
    tokens, lengths, idx, valid = infer_jit(model, feats, fmask, jnp.asarray(prompt["input_ids"]),
                                            jnp.asarray(prompt["attention_mask"]), jax.random.key(0),
                                            sampling=sampling, k=4)
    # by hand, outside jit: scorer -> hard top-k -> gather -> standardise -> projector -> splice -> generate
    sel = hard_topk(model.scorer(feats, fmask), 4, fmask)
    np.testing.assert_array_equal(idx, sel.indices)
    assert (np.diff(np.asarray(idx), axis=1) > 0).all()  # slide order
    vis = model.projector(standardize_tokens(gather_tokens(feats, sel.indices)))
    ids = jnp.asarray(prompt["input_ids"])
    emb, mask, _ = splice(model.llm.embed_tokens(ids), ids, jnp.asarray(prompt["attention_mask"]),
                          model.config.image_token_id, vis, sel.valid)
    ref_tokens, ref_lengths = generate(model.llm, inputs_embeds=emb, attention_mask=mask, max_new_tokens=6,
                                       stop_token_ids=sampling.stop_token_ids, pad_token_id=tok.pad_token_id)
    np.testing.assert_array_equal(tokens, ref_tokens)
    np.testing.assert_array_equal(lengths, ref_lengths)


def test_inference_graph_has_no_training_pieces(model, tok, batch):
    """Poisoning the denoiser with NaN changes nothing, and no Soft Top-K / noise op is traced."""
    prompt = encode_chats(tok, ["What grade?"] * 3, prompt_only=True)
    sampling = SamplingConfig(max_new_tokens=3, pad_token_id=0)
    args = (jnp.asarray(batch["features"]), jnp.asarray(batch["feature_mask"]), jnp.asarray(prompt["input_ids"]),
            jnp.asarray(prompt["attention_mask"]), jax.random.key(0))
    jaxpr = str(jax.make_jaxpr(lambda m, *a: infer_jit(m, *a, sampling=sampling, k=4))(model, *args))
    assert "custom_vjp" not in jaxpr and "erf_inv" not in jaxpr and "threefry" not in jaxpr
    graphdef, state = nnx.split(model)
    poisoned = nnx.merge(graphdef, jax.tree.map(lambda x: x, state))
    for _, var in nnx.to_flat_state(nnx.state(poisoned.denoiser)):
        var[...] = jnp.full_like(var[...], jnp.nan)
    a = infer_jit(model, *args, sampling=sampling, k=4)
    b = infer_jit(poisoned, *args, sampling=sampling, k=4)
    np.testing.assert_array_equal(a[0], b[0])


def test_predictor_selectors_share_one_program(model, tok, batch):
    pred = SparseWSIPredictor(model, tok, k=4, max_new_tokens=3, all_tokens_cap=16)
    qs = ["What grade?", "Describe the slide.", "Any invasion?"]
    learned = pred.predict(batch["features"], batch["feature_mask"], qs)
    host = pred.predict(batch["features"], batch["feature_mask"], qs, selector="learned")
    assert len(learned.texts) == 3 and learned.indices.shape == (3, 4)
    np.testing.assert_array_equal(learned.indices, host.indices)  # host twin == in-graph Hard Top-K
    # Host scores pad the bag to a bucket: the same scores as the unpadded bag, and one compiled shape per bucket.
    n = batch["features"].shape[1]
    direct = np.asarray(model.scores(jnp.asarray(batch["features"]), jnp.asarray(batch["feature_mask"], bool)))
    padded = pred.host_scores(batch["features"], batch["feature_mask"])
    assert padded.shape == direct.shape and n % 64
    valid = np.asarray(batch["feature_mask"], bool)
    np.testing.assert_allclose(padded[valid], direct[valid], rtol=1e-5, atol=1e-5)
    from sparsewsi.model.inference import _scores_jit

    before = _scores_jit._cache_size()
    pred.host_scores(batch["features"][:, : n - 1], batch["feature_mask"][:, : n - 1])
    assert _scores_jit._cache_size() == before  # n - 1 falls in the same bucket
    for name in ("random", "uniform", "spatial"):
        out = pred.predict(batch["features"], batch["feature_mask"], qs, selector=name, coords=batch["coords"])
        assert out.indices.shape == (3, 4)
        assert all(batch["feature_mask"][i, out.indices[i][out.valid[i]]].all() for i in range(3))
    out = pred.predict(batch["features"], batch["feature_mask"], qs, selector="all")
    assert out.indices.shape == (3, 16)


def test_bag_feature_norm_keeps_tokens_apart_when_features_share_a_large_component():
    """Random-weight encoders give patch features = big shared vector + tiny patch-specific part:
    per-token standardisation leaves the visual tokens identical, bag standardisation does not."""
    import dataclasses

    import jax.numpy as jnp
    import numpy as np

    from sparsewsi.llm import build_tiny_tokenizer, tiny_config
    from sparsewsi.model import SparseWSI, SparseWSIConfig, image_token_id

    tok = build_tiny_tokenizer()
    rng = np.random.default_rng(0)
    shared = rng.normal(size=(1, 1, 16)) * 10
    feats = jnp.asarray(shared + 1e-4 * rng.normal(size=(2, 40, 16)), jnp.float32)
    mask = jnp.ones((2, 40), bool).at[1, 30:].set(False)
    base = SparseWSIConfig(feature_dim=16, llm=tiny_config(hidden_size=32, intermediate_size=64, num_hidden_layers=1),
                           image_token_id=image_token_id(tok), k=8, projector_hidden=32)
    idx = jnp.tile(jnp.arange(8)[None], (2, 1))
    spread = {}
    for norm in ("token", "bag", "bag_robust"):
        model = SparseWSI(dataclasses.replace(base, feature_norm=norm))
        vis = model.project_tokens(feats, idx, mask)
        spread[norm] = float(jnp.std(vis, axis=1).mean() / jnp.std(vis))
        x = model.input_features(feats, mask)
        assert bool(jnp.all(x[1, 30:] == 0)) or norm == "token"
    assert spread["token"] < 1e-2 < 0.3 < min(spread["bag"], spread["bag_robust"])
    with np.testing.assert_raises(ValueError):
        dataclasses.replace(base, feature_norm="layer")
