"""Export: the PyTorch reference selector reproduces the Flax scores and projector outputs (<= 1e-5),
the exported Hugging Face LLM has the LoRA merged, and ``sparsewsi export`` works on a workdir."""

import json

import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from sparsewsi.cli import main as cli_main  # noqa: E402
from sparsewsi.llm import apply_lora, build_tiny_tokenizer, create_model, LoRAConfig, tiny_config  # noqa: E402
from sparsewsi.model import ModelSpec, SparseWSI, SparseWSIConfig, flat_params, image_token_id  # noqa: E402
from sparsewsi.model.checkpoint import SPEC_FILE  # noqa: E402
from sparsewsi.model.export import export  # noqa: E402


def _randomise(model, seed=0):
    """Give every parameter (incl. LoRA b, zero at init) non-trivial values."""
    from flax import nnx
    rng = np.random.default_rng(seed)
    for _, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        var[...] = var[...] + jnp.asarray(0.05 * rng.normal(size=var[...].shape), var[...].dtype)


@pytest.mark.parametrize("kind,feature_norm,squares", [("mlp", "token", False), ("transformer", "token", False),
                                                       ("mlp", "bag", False), ("mlp", "bag_robust", False),
                                                       ("mlp", "bag_robust", True), ("transformer", "bag", True)])
def test_torch_reference_matches_flax(tmp_path, kind, feature_norm, squares):
    tok = build_tiny_tokenizer()
    cfg = SparseWSIConfig(feature_dim=24, llm=tiny_config(hidden_size=32, intermediate_size=64, num_hidden_layers=1),
                          image_token_id=image_token_id(tok), k=5, scorer_kind=kind, scorer_hidden=32,
                          scorer_depth=2, scorer_heads=4, projector_hidden=48, feature_norm=feature_norm,
                          scorer_squares=squares)
    llm = apply_lora(create_model(cfg.llm), LoRAConfig(rank=4, alpha=8.0))
    model = SparseWSI(cfg, llm)
    _randomise(model)
    out = export(model, tmp_path / "export", tokenizer=tok)
    assert {p.name for p in out.iterdir()} >= {"llm", "selector.safetensors", "selector.json", "sparsewsi_torch.py"}

    import importlib.util
    spec = importlib.util.spec_from_file_location("sparsewsi_torch", out / "sparsewsi_torch.py")
    ref = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ref)
    sel = ref.SparseWSISelector.from_folder(out)

    rng = np.random.default_rng(1)
    feats = rng.normal(size=(3, 40, 24)).astype(np.float32)
    mask = np.ones((3, 40), bool)
    mask[1, 25:] = False
    flax_scores = np.asarray(model.scorer(jnp.asarray(feats), jnp.asarray(mask)))
    torch_scores = sel.scorer(torch.from_numpy(feats), torch.from_numpy(mask)).detach().numpy()
    np.testing.assert_allclose(torch_scores, flax_scores, atol=1e-5, rtol=0)
    emb, idx, valid = sel.visual_tokens(feats, mask)
    sel_flax = model.select(jnp.asarray(feats), jnp.asarray(mask), 5)
    np.testing.assert_array_equal(idx.numpy(), sel_flax.indices)
    np.testing.assert_array_equal(valid.numpy(), sel_flax.valid)
    flax_emb = np.asarray(model.project_tokens(jnp.asarray(feats), sel_flax.indices, jnp.asarray(mask)))
    np.testing.assert_allclose(emb.numpy(), flax_emb, atol=1e-5, rtol=0)

    if kind == "mlp" and feature_norm == "token":  # the LLM export (LoRA merged) once: Hugging Face logits == Flax logits with adapters
        from transformers import AutoModelForCausalLM
        hf = AutoModelForCausalLM.from_pretrained(str(out / "llm")).eval()
        ids = np.array([[1, 5, 9, 17, 33, 2]], np.int64)
        with torch.no_grad():
            hf_logits = hf(torch.from_numpy(ids)).logits.numpy()
        np.testing.assert_allclose(hf_logits, np.asarray(model.llm(jnp.asarray(ids))), atol=2e-5)


def test_export_command_on_a_workdir(tmp_path):
    """A workdir with model.json and a checkpoint of trained params -> ``sparsewsi export``."""
    from sparsewsi.training import Checkpointer
    tok = build_tiny_tokenizer()
    cfg = SparseWSIConfig(feature_dim=16, llm=tiny_config(hidden_size=32, intermediate_size=64, num_hidden_layers=1),
                          image_token_id=image_token_id(tok), k=4, scorer_hidden=16, projector_hidden=16)
    spec = ModelSpec(model=cfg, tokenizer="builtin:tiny", lora_rank=2, lora_alpha=4.0)
    work = tmp_path / "run"
    work.mkdir()
    (work / SPEC_FILE).write_text(spec.to_json())
    from sparsewsi.model import build_model
    model = build_model(spec)
    trained = {n: np.asarray(v) + 0.01 for n, v in flat_params(model).items() if not n.startswith("llm.") or ".lora." in n}
    ckpt = Checkpointer(work, every=1, async_save=False)
    ckpt.save(7, {"params": trained, "opt_state": {}, "step": np.int32(7)})
    ckpt.close()
    assert cli_main(["export", "--checkpoint", str(work), "--out", str(tmp_path / "exp")]) == 0
    meta = json.loads((tmp_path / "exp" / "selector.json").read_text())
    assert meta["k"] == 4 and meta["image_token_id"] == cfg.image_token_id
    assert cli_main(["export", "--checkpoint", str(work), "--out", str(tmp_path / "exp")]) == 1  # no overwrite
    assert cli_main(["export", "--checkpoint", str(tmp_path), "--out", str(tmp_path / "x")]) == 1  # not a workdir


def test_export_folder_loads_back_for_evaluation(tmp_path):
    """``load_checkpoint(<export folder>)`` (what ``sparsewsi eval --checkpoint`` calls) rebuilds the
    model: same scores, selection and visual tokens, and LLM logits equal to the LoRA model's."""
    from sparsewsi.model import load_checkpoint

    tok = build_tiny_tokenizer()
    cfg = SparseWSIConfig(feature_dim=20, llm=tiny_config(hidden_size=32, intermediate_size=64, num_hidden_layers=1),
                          image_token_id=image_token_id(tok), k=6, scorer_hidden=16, projector_hidden=24,
                          feature_norm="bag")
    model = SparseWSI(cfg, apply_lora(create_model(cfg.llm), LoRAConfig(rank=4, alpha=8.0)))
    _randomise(model)
    out = export(model, tmp_path / "exp", tokenizer=tok)
    loaded, tok2, spec = load_checkpoint(out)
    assert spec.model.feature_norm == "bag" and tok2 is not None and loaded.denoiser is None

    rng = np.random.default_rng(0)
    feats = jnp.asarray(rng.normal(size=(2, 30, 20)), jnp.float32)
    mask = jnp.ones((2, 30), bool).at[1, 20:].set(False)
    np.testing.assert_allclose(np.asarray(loaded.scores(feats, mask)), np.asarray(model.scores(feats, mask)), atol=1e-5)
    sel = model.select(feats, mask)
    np.testing.assert_array_equal(np.asarray(loaded.select(feats, mask).indices), np.asarray(sel.indices))
    ids = jnp.asarray([[1, 5, cfg.image_token_id, 9, 17]])
    ids = jnp.tile(ids, (2, 1))
    am = jnp.ones_like(ids)
    e1, m1 = model.prompt_embeddings(feats, ids, am, sel.indices, sel.valid, mask)
    e2, m2 = loaded.prompt_embeddings(feats, ids, am, sel.indices, sel.valid, mask)
    np.testing.assert_allclose(np.asarray(e1), np.asarray(e2), atol=1e-5)
    h1, _ = model.llm.model(e1, m1)
    h2, _ = loaded.llm.model(e2, m2)
    np.testing.assert_allclose(np.asarray(loaded.llm.logits(h2)), np.asarray(model.llm.logits(h1)), atol=2e-5)
