"""Training: overfitting, frozen parameters, 8 simulated devices vs one, resume-after-kill equality,
corrupt-checkpoint fallback, metrics files and fail-fast on NaN."""

import importlib.util
import json
import pathlib

import jax
import numpy as np
import pytest

from sparsewsi.model import flat_params, load_checkpoint
from sparsewsi.model.checkpoint import restore_params
from sparsewsi.training import ArrayIterator, Checkpointer, NonFiniteLossError, spec_from_config, synthetic_examples, train
from sparsewsi.model import load_tokenizer

REPO = pathlib.Path(__file__).resolve().parents[1]


def tiny_config(steps: int, stage: int = 2):
    spec = importlib.util.spec_from_file_location("configs_tiny", REPO / "configs" / "tiny.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    c = mod.get_config(f"steps={steps},stage={stage}")
    c.progress = False
    c.batch_size = 4
    c.model.feature_dim = 16
    c.model.scorer_hidden = 32
    c.model.projector_hidden = 32
    c.model.k = 4
    c.model.tau_steps = 20
    c.llm.tiny = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1)
    c.optim.warmup_steps = 2
    return c


@pytest.fixture(scope="module")
def examples():
    cfg = tiny_config(4)
    tok = load_tokenizer(spec_from_config(cfg))
    return synthetic_examples(tok, 8, num_tokens=32, feature_dim=16, evidence_tokens=3, seed=0)


class KilledIterator(ArrayIterator):
    """Dies (like a killed process) when asked for batch number ``die_at``."""

    def __init__(self, *a, die_at: int, **kw):
        super().__init__(*a, **kw)
        self.calls, self.die_at = 0, die_at

    def __next__(self):
        self.calls += 1
        if self.calls == self.die_at:
            raise KeyboardInterrupt("simulated kill")
        return super().__next__()


class Limited(ArrayIterator):
    def __init__(self, *a, limit: int, **kw):
        super().__init__(*a, **kw)
        self.left = limit

    def __next__(self):
        if self.left == 0:
            raise StopIteration
        self.left -= 1
        return super().__next__()


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory, examples):
    """Uninterrupted: 6 steps on ONE device, checkpoints every 2 steps."""
    cfg = tiny_config(6)
    cfg.checkpoint.every = 2
    workdir = tmp_path_factory.mktemp("reference")
    out = train(cfg, ArrayIterator(examples, 4, seed=1), workdir, devices=jax.devices()[:1])
    return cfg, workdir, out


def test_frozen_parameters_stay_bit_identical_and_lora_trains(reference_run):
    cfg, workdir, out = reference_run
    spec = out["spec"]
    from sparsewsi.model import build_model
    fresh = flat_params(build_model(spec))
    trained = flat_params(out["model"])
    frozen = [n for n in fresh if n.startswith("llm.") and ".lora." not in n]
    assert frozen and all(np.array_equal(np.asarray(fresh[n]), np.asarray(trained[n])) for n in frozen)
    lora_b = [n for n in fresh if n.endswith(".lora.b")]
    assert lora_b and any(not np.array_equal(fresh[n], trained[n]) for n in lora_b)  # b starts at 0, moves
    assert not np.array_equal(fresh["scorer.backbone.fc1.kernel"], trained["scorer.backbone.fc1.kernel"])
    # Only trained parameters are stored in the checkpoint.
    stored = restore_params(workdir, 6)
    assert set(stored) == {n for n in fresh if not n.startswith("llm.") or ".lora." in n}


def test_metrics_files(reference_run):
    _, workdir, out = reference_run
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    for key in ("loss", "lr", "tau", "grad_norm", "mask_topk_mass", "tokens_per_s"):
        assert all(np.isfinite(r[key]) for r in rows), key
    assert rows[0]["tau"] > rows[-1]["tau"]  # annealed
    assert list((workdir / "tensorboard").glob("events.out.tfevents.*"))


def test_eight_devices_equal_one_device(reference_run, tmp_path, examples):
    cfg, ref_dir, ref = reference_run
    cfg8 = tiny_config(6)
    cfg8.mesh.data, cfg8.mesh.fsdp, cfg8.mesh.tensor = 2, 2, 2
    assert jax.device_count() == 8
    out = train(cfg8, Limited(examples, 4, seed=1, limit=2), tmp_path)
    assert len(out["history"]) == 2
    np.testing.assert_allclose([h["loss"] for h in out["history"]], [h["loss"] for h in ref["history"][:2]],
                               rtol=2e-5)
    ref_params = restore_params(ref_dir, 2)
    got = {k: np.asarray(v) for k, v in out["state"]["params"].items()}
    some_sharded = [v for v in out["state"]["params"].values() if not v.sharding.is_fully_replicated]
    assert some_sharded  # the LoRA / LLM rules actually split something over the mesh
    # The scorer's output bias shifts every score of a bag alike and the scores are standardised per bag,
    # so its gradient is rounding noise, which Adam turns into steps that differ with the device layout
    # (one device -2.5e-6, eight -6e-8, on one machine's CPU): it only has to stay ~0 in both runs.
    shift_only = "scorer.backbone.fc2.bias"
    assert shift_only in ref_params
    for name, value in ref_params.items():
        if name == shift_only:
            assert np.abs(value).max() < 1e-4 and np.abs(got[name]).max() < 1e-4
            continue
        np.testing.assert_allclose(got[name], value, atol=2e-6, rtol=1e-4, err_msg=name)


def test_resume_after_kill_equals_uninterrupted_run(reference_run, tmp_path, examples):
    cfg, ref_dir, ref = reference_run
    with pytest.raises(KeyboardInterrupt):
        train(cfg, KilledIterator(examples, 4, seed=1, die_at=5), tmp_path, devices=jax.devices()[:1])
    assert sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()) == [2, 4]
    resumed = train(cfg, ArrayIterator(examples, 4, seed=1), tmp_path, devices=jax.devices()[:1])
    assert resumed["resumed_from"] == 4
    assert [h["loss"] for h in resumed["history"]] == [h["loss"] for h in ref["history"][4:]]  # exact
    for name, value in restore_params(ref_dir, 6).items():
        np.testing.assert_array_equal(np.asarray(resumed["state"]["params"][name]), value, err_msg=name)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]

    # A corrupt newest checkpoint falls back to the previous one, in the trainer and in the evaluation loader.
    corrupted = 0
    for f in (tmp_path / "checkpoints" / "6" / "state").rglob("*"):
        if f.is_file() and f.parent.name == "d":
            f.write_bytes(b"corrupt")
            corrupted += 1
    assert corrupted
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), resumed["state"])
    ckpt = Checkpointer(tmp_path, every=2)
    state, data_state, step = ckpt.restore_latest(abstract)
    ckpt.close()
    assert step == 4 and data_state == {"epoch": 2, "position": 0, "seed": 1}
    model, tok, spec = load_checkpoint(tmp_path)
    got = flat_params(model)
    for name, value in restore_params(tmp_path, 4).items():
        np.testing.assert_array_equal(np.asarray(got[name]), value, err_msg=name)
        np.testing.assert_array_equal(np.asarray(state["params"][name]), value, err_msg=name)


def test_tiny_model_overfits_tiny_dataset(tmp_path, examples):
    cfg = tiny_config(60)
    cfg.optim.lr = 1e-2
    cfg.optim.warmup_steps = 3
    # Everything trains except the attention's query/key projections (frozen: checked bit-identical).
    cfg.optim.param_groups = [(r".*self_attn\.(q_proj|k_proj)\..*", None), (r".*", 1.0)]
    cfg.lora.rank = 0
    cfg.checkpoint.every = 0
    out = train(cfg, ArrayIterator(examples[:4], 4, seed=0), tmp_path, devices=jax.devices()[:1])
    losses = [h["loss"] for h in out["history"]]
    assert losses[-1] <= 0.1 * losses[0], losses[::5]
    from sparsewsi.model import build_model
    fresh, trained = flat_params(build_model(out["spec"])), flat_params(out["model"])
    frozen = [n for n in fresh if "q_proj" in n or "k_proj" in n]
    assert frozen and all(np.array_equal(fresh[n], trained[n]) for n in frozen)


def test_nan_fails_fast(tmp_path, examples):
    cfg = tiny_config(3)
    bad = [dict(e) for e in examples[:4]]
    bad[0]["features"] = np.full_like(bad[0]["features"], np.nan)
    with pytest.raises(NonFiniteLossError, match="step 1"):
        train(cfg, ArrayIterator(bad, 4, seed=0), tmp_path, devices=jax.devices()[:1])


class Emptied(ArrayIterator):
    """Batches as the input pipeline delivers them when feature files are missing: every example (or every
    ``every``-th batch's examples) kept with ``example_valid`` False and all masks False."""

    def __init__(self, *a, every: int = 1, **kw):
        super().__init__(*a, **kw)
        self.every, self.count = every, 0

    def __next__(self):
        batch = dict(super().__next__())
        self.count += 1
        empty = self.count % self.every == 0
        batch["example_valid"] = np.full(len(batch["input_ids"]), not empty)
        if empty:
            for key in ("feature_mask", "attention_mask", "loss_mask"):
                batch[key] = np.zeros_like(batch[key])
        return batch


def test_a_run_whose_batches_hold_no_readable_example_stops_with_the_data_paths(tmp_path, examples):
    cfg = tiny_config(30)
    cfg.checkpoint.every = 0
    with pytest.raises(ValueError, match="no readable example.*features_root"):
        train(cfg, Emptied(examples, 4, seed=0), tmp_path / "all", devices=jax.devices()[:1])
    # Some empty batches (a few missing files) are not an error.
    cfg.total_steps = 12
    out = train(cfg, Emptied(examples, 4, seed=0, every=2), tmp_path / "some", devices=jax.devices()[:1])
    assert len(out["history"]) == 12


def test_optimizer_groups_schedule_and_accumulation():
    import jax.numpy as jnp

    from sparsewsi.training import make_optimizer
    from sparsewsi.training.optimizer import group_of

    rules = [(r"llm\..*\.lora\..*", 1.0), (r"llm\..*", None), (r"projector\..*", 10.0), (r".*", 1.0)]
    assert group_of("llm.model.layers.0.self_attn.q_proj.lora.a", rules) == 1.0
    assert group_of("llm.model.layers.0.self_attn.q_proj.kernel", rules) is None
    assert group_of("projector.fc1.kernel", rules) == 10.0
    with pytest.raises(ValueError, match="no param_groups rule"):
        group_of("x", [(r"llm\..*", None)])
    params = {"projector.w": jnp.ones(3), "scorer.w": jnp.ones(3)}
    with pytest.raises(ValueError, match="frozen"):
        make_optimizer({"llm.w": jnp.ones(1)}, rules, lr=1.0, warmup_steps=1, total_steps=10)

    # Accumulating 2 micro-steps == one step on the mean gradient; the projector group moves 10x.
    kw = dict(lr=0.1, warmup_steps=1, total_steps=10, clip_norm=None)
    tx2, _ = make_optimizer(params, rules, accumulate_steps=2, **kw)
    tx1, sched = make_optimizer(params, rules, **kw)
    g1 = {"projector.w": jnp.array([1.0, 2.0, 3.0]), "scorer.w": jnp.array([0.5, -1.0, 2.0])}
    g2 = {"projector.w": jnp.array([3.0, 0.0, -1.0]), "scorer.w": jnp.array([1.5, 3.0, 0.0])}
    mean = jax.tree.map(lambda a, b: (a + b) / 2, g1, g2)
    s2, s1 = tx2.init(params), tx1.init(params)
    for cycle in range(2):  # the schedule's first step has lr 0 (warm-up): compare the second update
        u, s2 = tx2.update(g1, s2, params)
        assert all(float(jnp.abs(v).max()) == 0 for v in u.values())  # nothing applied mid-accumulation
        u2, s2 = tx2.update(g2, s2, params)
        u1, s1 = tx1.update(mean, s1, params)
    assert float(jnp.abs(u1["scorer.w"]).max()) > 0
    for k in params:
        np.testing.assert_allclose(u2[k], u1[k], rtol=1e-5)
    assert float(sched(0)) == 0.0 and abs(float(sched(1)) - 0.1) < 1e-7  # warm-up then peak
    np.testing.assert_allclose(np.abs(u1["projector.w"]) / np.abs(u1["scorer.w"]), 10.0, rtol=1e-4)


def test_optimizer_group_start_step_holds_a_group_still_until_then():
    """A rule's third entry: the group's learning rate is 0 before that optimizer step, then its scale."""
    import jax.numpy as jnp

    from sparsewsi.training import make_optimizer
    from sparsewsi.training.optimizer import start_of

    rules = [(r"llm\..*", 0.5, 3), (r".*", 1.0)]
    assert start_of("llm.w", rules) == 3 and start_of("scorer.w", rules) == 0
    params = {"llm.w": jnp.ones(2), "scorer.w": jnp.ones(2)}
    tx, _ = make_optimizer(params, rules, lr=0.1, warmup_steps=1, total_steps=10, clip_norm=None)
    plain, _ = make_optimizer(params, [(r"llm\..*", 0.5), (r".*", 1.0)], lr=0.1, warmup_steps=1, total_steps=10,
                              clip_norm=None)
    state, ref = tx.init(params), plain.init(params)
    g = {"llm.w": jnp.array([1.0, -2.0]), "scorer.w": jnp.array([0.5, 1.0])}
    for step in range(5):
        u, state = tx.update(g, state, params)
        r, ref = plain.update(g, ref, params)
        np.testing.assert_allclose(u["scorer.w"], r["scorer.w"], rtol=1e-6)
        if step < 3:
            assert float(jnp.abs(u["llm.w"]).max()) == 0.0
        else:  # from the start step on, exactly the plain group's update (Adam's moments gathered meanwhile)
            np.testing.assert_allclose(u["llm.w"], r["llm.w"], rtol=1e-6)
            assert float(jnp.abs(u["llm.w"]).max()) > 0
    with pytest.raises(ValueError, match="expected"):
        make_optimizer(params, [(r".*", 1.0, 0, 4)], lr=0.1, warmup_steps=1, total_steps=10)
    with pytest.raises(ValueError, match="start step"):
        start_of("x", [(r".*", 1.0, -1)])


@pytest.mark.parametrize("name,arg", [("tiny", ""), ("stage1_caption", "runlocal"), ("stage2_vqa", "runlocal"),
                                      ("stage2_vqa", "full,runlocal")])
def test_configs_build_a_model_spec_and_document_their_launch(name, arg):
    from sparsewsi.train_cli import apply_overrides, load_config

    path = REPO / "configs" / f"{name}.py"
    assert f"sparsewsi train --config configs/{name}.py" in path.read_text()  # launch command in the docstring
    cfg = apply_overrides(load_config(f"{path}:{arg}"), ["optim.lr=5e-4", "model.k=4"])
    assert cfg.optim.lr == 5e-4 and isinstance(cfg.optim.lr, float)
    spec = spec_from_config(cfg)
    from sparsewsi.model import image_token_id as image_id_of
    assert spec.model.k == 4 and spec.model.image_token_id == image_id_of(load_tokenizer(spec))
    from sparsewsi.model import build_model, flat_params
    from sparsewsi.training.optimizer import group_of
    names = list(flat_params(build_model(spec)))
    trained = [n for n in names if group_of(n, [tuple(r) for r in cfg.optim.param_groups]) is not None]
    assert any(n.startswith("scorer.") for n in trained) and any(n.startswith("projector.") for n in trained)
    if name == "stage1_caption":
        assert not any(n.startswith("llm.") for n in trained)  # stage 1: LLM frozen
    with pytest.raises(KeyError, match="no field"):
        apply_overrides(cfg, ["optim.lrr=1"])


@pytest.mark.parametrize("init_llm", [False, True])
def test_init_from_an_earlier_stage(tmp_path, examples, init_llm):
    """Stage 2 starts from stage 1's new modules; with ``init_llm`` from its trained LLM too."""
    cfg1 = tiny_config(3)
    cfg1.lora.rank = 0
    cfg1.optim.lr = 1e-2
    cfg1.optim.param_groups = [(r".*", 1.0)]  # stage 1 trains the (random) LLM as well
    cfg1.checkpoint.every = 3
    train(cfg1, ArrayIterator(examples, 4, seed=0), tmp_path / "stage1", devices=jax.devices()[:1])
    stage1 = restore_params(tmp_path / "stage1", 3)
    cfg2 = tiny_config(1)
    cfg2.lora.rank = 0
    cfg2.optim.lr = 0.0  # no update: the run's weights are the ones it started from
    cfg2.optim.param_groups = [(r".*", 1.0)]
    cfg2.checkpoint.every = 0
    cfg2.init_from = str(tmp_path / "stage1")
    cfg2.init_llm = init_llm
    out = train(cfg2, ArrayIterator(examples, 4, seed=0), tmp_path / "stage2", devices=jax.devices()[:1])
    from sparsewsi.model import build_model
    got, fresh = flat_params(out["model"]), flat_params(build_model(out["spec"]))
    llm_names = [n for n in stage1 if n.startswith("llm.")]
    assert llm_names and any(n.startswith("scorer.") for n in stage1)
    # Stage 1 moved the LLM, so loading it or not is visible.
    assert any(not np.array_equal(stage1[n], fresh[n]) for n in llm_names)
    for name, value in stage1.items():
        want = fresh[name] if name.startswith("llm.") and not init_llm else value
        np.testing.assert_array_equal(got[name], want, err_msg=name)
    # Freezing what init_from supplied would lose it from this run's checkpoints: refused up front.
    cfg3 = tiny_config(1)
    cfg3.lora.rank = 0
    cfg3.optim.param_groups = [(r"llm\..*", None), (r".*", 1.0)]
    cfg3.init_from, cfg3.init_llm = str(tmp_path / "stage1"), init_llm
    if init_llm:
        with pytest.raises(ValueError, match=r"init_from .*stage1 supplies \d+ parameters that optim.param_groups freezes"):
            train(cfg3, ArrayIterator(examples, 4, seed=0), tmp_path / "stage3", devices=jax.devices()[:1])
        assert not (tmp_path / "stage3" / "checkpoints").exists()
    else:  # the LLM comes from its source, so freezing it is fine
        train(cfg3, ArrayIterator(examples, 4, seed=0), tmp_path / "stage3", devices=jax.devices()[:1])
