"""The Flax LLM against transformers PyTorch on tiny random Qwen2 / Llama checkpoints built here."""

from __future__ import annotations

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from sparsewsi import llm  # noqa: E402
from sparsewsi.llm.hf_io import CheckpointError  # noqa: E402

VOCAB = 384
PROMPT_LEN = 12


def _hf_config(name: str):
    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, initializer_range=0.2, eos_token_id=2, pad_token_id=0,
                  max_position_embeddings=512)
    if name == "qwen2_tied":
        return transformers.Qwen2Config(num_key_value_heads=2, tie_word_embeddings=True, **common)
    if name == "qwen2_untied":
        return transformers.Qwen2Config(num_key_value_heads=2, tie_word_embeddings=False,
                                        rope_parameters={"rope_type": "default", "rope_theta": 1e6}, **common)
    if name == "llama":  # multi-query attention, explicit head_dim != hidden / heads, llama3 RoPE scaling
        return transformers.LlamaConfig(
            num_key_value_heads=1, head_dim=24, tie_word_embeddings=False, attention_bias=True, mlp_bias=True,
            rope_parameters={"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0, "low_freq_factor": 1.0,
                             "high_freq_factor": 4.0, "original_max_position_embeddings": 64}, **common)
    raise KeyError(name)


@pytest.fixture(scope="module")
def tiny_tokenizer():
    return llm.build_tiny_tokenizer(vocab_size=VOCAB)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, tiny_tokenizer):
    """name -> (PyTorch model, folder holding its save_pretrained export + tokenizer)."""
    out = {}
    for i, name in enumerate(("qwen2_tied", "qwen2_untied", "llama")):
        torch.manual_seed(i)
        model = transformers.AutoModelForCausalLM.from_config(_hf_config(name)).eval()
        folder = tmp_path_factory.mktemp(name)
        model.save_pretrained(folder)
        tiny_tokenizer.save_pretrained(folder)
        out[name] = (model, folder)
    return out


def _ids(batch=2, length=PROMPT_LEN, seed=0):
    return np.random.RandomState(seed).randint(3, VOCAB, (batch, length))


def _left_padded(lengths, length=PROMPT_LEN, seed=1):
    ids = _ids(len(lengths), length, seed)
    mask = np.zeros_like(ids)
    for r, n in enumerate(lengths):
        mask[r, length - n:] = 1
        ids[r, :length - n] = 0
    return ids, mask


_forward = jax.jit(lambda model, ids, mask: model(ids, attention_mask=mask))
_forward_embeds = jax.jit(lambda model, embeds, mask: model(inputs_embeds=embeds, attention_mask=mask))


def _logits(model, ids, mask=None):
    """Our logits as numpy, through one compiled program (eager dispatch compiles every primitive)."""
    ids = jnp.asarray(ids)
    return np.asarray(_forward(model, ids, jnp.ones(ids.shape, jnp.int32) if mask is None else jnp.asarray(mask)))


def _torch_logits(model, ids, mask=None):
    with torch.no_grad():
        kw = {} if mask is None else {"attention_mask": torch.tensor(mask)}
        return model(torch.tensor(ids), **kw).logits.float().numpy()


# ------------------------------------------------------------------------------------------- config
def test_config_parses_both_rope_layouts_and_rejects_unsupported():
    base = dict(model_type="qwen2", architectures=["Qwen2ForCausalLM"], vocab_size=10, hidden_size=8,
                intermediate_size=16, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1)
    old = llm.LLMConfig.from_hf_dict({**base, "rope_theta": 1e6, "rope_scaling": None})
    new = llm.LLMConfig.from_hf_dict({**base, "rope_parameters": {"rope_type": "default", "rope_theta": 1e6}})
    assert old == new and old.rope_theta == 1e6 and old.head_dim == 4 and old.qkv_bias and not old.o_bias
    scaled = llm.LLMConfig.from_hf_dict({**base, "rope_theta": 1e4, "rope_scaling": {"type": "linear", "factor": 2.0}})
    assert dict(scaled.rope_scaling) == {"rope_type": "linear", "factor": 2.0}
    assert llm.LLMConfig.from_hf_dict(scaled.to_hf_dict()) == scaled  # config.json round trip
    with pytest.raises(llm.UnsupportedModelError, match="gpt2"):
        llm.LLMConfig.from_hf_dict({**base, "model_type": "gpt2"}, source="x/config.json")
    with pytest.raises(llm.UnsupportedModelError, match="yarn"):
        llm.LLMConfig.from_hf_dict({**base, "rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}})
    with pytest.raises(llm.UnsupportedModelError, match="sliding"):
        llm.LLMConfig.from_hf_dict({**base, "use_sliding_window": True})
    with pytest.raises(ValueError, match="x/config.json.*hidden_size"):
        llm.LLMConfig.from_hf_dict({k: v for k, v in base.items() if k != "hidden_size"}, source="x/config.json")


# ------------------------------------------------------------------------------------------ parity
@pytest.mark.parametrize("name", ["qwen2_tied", "qwen2_untied", "llama"])
def test_logits_match_transformers(checkpoints, name):
    hf, folder = checkpoints[name]
    model = llm.load_hf(folder)
    assert (model.lm_head is None) == (name == "qwen2_tied")
    ids, mask = _left_padded([PROMPT_LEN, 7, 3])
    ours = _logits(model, ids, mask)
    ref = _torch_logits(hf, ids, mask)
    valid = mask.astype(bool)
    assert np.abs(ours - ref)[valid].max() <= 1e-4
    # A padded row equals the same tokens unpadded; inputs_embeds equals input_ids.
    alone = _logits(model, ids[1:2, PROMPT_LEN - 7:])
    np.testing.assert_allclose(ours[1, PROMPT_LEN - 7:], alone[0], atol=1e-5)
    embeds = model.embed_tokens(jnp.asarray(ids))
    via_embeds = np.asarray(_forward_embeds(model, embeds, jnp.asarray(mask)))
    np.testing.assert_allclose(via_embeds, ours, atol=1e-6)


@pytest.mark.parametrize("name", ["qwen2_untied", "llama"])
def test_greedy_generation_is_token_identical_to_transformers(checkpoints, name):
    hf, folder = checkpoints[name]
    model = llm.load_hf(folder)
    ids, mask = _left_padded([PROMPT_LEN, 9, 4], seed=2)
    ours, lengths = llm.generate(model, ids, attention_mask=mask, max_new_tokens=32, stop_token_ids=())
    with torch.no_grad():
        ref = hf.generate(torch.tensor(ids), attention_mask=torch.tensor(mask), max_new_tokens=32, do_sample=False,
                          eos_token_id=None, pad_token_id=0)[:, PROMPT_LEN:].numpy()
    assert ref.shape == (3, 32) and (lengths == 32).all()
    np.testing.assert_array_equal(ours, ref)


def test_stop_tokens_padding_layouts_and_user_jit(checkpoints):
    model = llm.load_hf(checkpoints["qwen2_tied"][1])
    ids, mask = _left_padded([PROMPT_LEN, 6], seed=3)
    free, _ = llm.generate(model, ids, attention_mask=mask, max_new_tokens=12, stop_token_ids=())
    # Right padding gives the same continuation as left padding.
    right_ids, right_mask = np.zeros_like(ids), np.zeros_like(mask)
    right_ids[0], right_mask[0] = ids[0], 1
    right_ids[1, :6], right_mask[1, :6] = ids[1, -6:], 1
    right, _ = llm.generate(model, right_ids, attention_mask=right_mask, max_new_tokens=12, stop_token_ids=())
    np.testing.assert_array_equal(right, free)
    # Stop at row 0's 5th token: it is kept, the rest is padding; row 1 runs on until it meets it.
    stop = int(free[0, 4])
    toks, lengths = llm.generate(model, ids, attention_mask=mask, max_new_tokens=12, stop_token_ids=(stop,),
                                 pad_token_id=VOCAB - 1)
    first = [int(np.argmax(free[r] == stop)) + 1 if (free[r] == stop).any() else 12 for r in range(2)]
    assert lengths.tolist() == first and first[0] <= 5
    for r in range(2):
        np.testing.assert_array_equal(toks[r, :first[r]], free[r, :first[r]])
        assert (toks[r, first[r]:] == VOCAB - 1).all()

    # generate_tokens inside the caller's own jit, starting from spliced embeddings.
    @jax.jit
    def fused(model, ids, mask, visual):
        emb = model.embed_tokens(ids)
        emb = emb.at[:, 2:6].set(visual)  # e.g. projected visual tokens at <image> slots
        return llm.generate_tokens(model, emb, mask, jax.random.key(0), llm.SamplingConfig(max_new_tokens=8))

    visual = jax.random.normal(jax.random.key(1), (2, 4, 64))
    fused_toks, _ = fused(model, jnp.asarray(ids), jnp.asarray(mask), visual)
    emb = model.embed_tokens(jnp.asarray(ids)).at[:, 2:6].set(visual)
    direct, _ = llm.generate(model, inputs_embeds=emb, attention_mask=mask, max_new_tokens=8, stop_token_ids=())
    np.testing.assert_array_equal(np.asarray(fused_toks), direct)


def test_sampling_temperature_and_top_p():
    logits = jnp.log(jnp.asarray([[0.05, 0.7, 0.2, 0.05]] * 64))
    keys = jax.random.split(jax.random.key(0), 50)
    cfg_p = llm.SamplingConfig(temperature=1.0, top_p=0.6)
    assert all((llm.sample_token(logits, k, cfg_p) == 1).all() for k in keys[:5])  # only the 0.7 token survives
    cfg_p2 = llm.SamplingConfig(temperature=1.0, top_p=0.8)
    drawn = np.concatenate([np.asarray(llm.sample_token(logits, k, cfg_p2)) for k in keys])
    assert set(drawn.tolist()) == {1, 2}  # the nucleus {0.7, 0.2}
    assert 0.7 < np.mean(drawn == 1) < 0.85  # renormalised 0.7 / 0.9 = 0.78
    drawn_t = np.concatenate([np.asarray(llm.sample_token(logits, k, llm.SamplingConfig(temperature=1.0))) for k in keys])
    assert set(drawn_t.tolist()) == {0, 1, 2, 3}
    with pytest.raises(ValueError, match="top_p"):
        llm.SamplingConfig(top_p=0.0)


def test_sampled_generation_is_reproducible(checkpoints, tiny_tokenizer):
    model = llm.load_hf(checkpoints["qwen2_tied"][1])
    kw = dict(max_new_tokens=10, temperature=1.5, top_p=0.95, stop_token_ids=())
    a, _ = llm.generate(model, _ids(), seed=1, **kw)
    b, _ = llm.generate(model, _ids(), seed=1, **kw)
    c, _ = llm.generate(model, _ids(), seed=2, **kw)
    np.testing.assert_array_equal(a, b)
    assert (a != c).any() and a.min() >= 0 and a.max() < VOCAB
    tokens, texts = llm.generate_text(model, tiny_tokenizer, ["Describe the slide.", [
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "Grade? <image>"}]], max_new_tokens=6)
    assert tokens.shape == (2, 6) and len(texts) == 2 and all(isinstance(t, str) for t in texts)
    assert texts[0] == tiny_tokenizer.decode(tokens[0], skip_special_tokens=True)


# ------------------------------------------------------------------------------------ import/export
def test_export_reload_is_bit_exact_and_loads_in_transformers(checkpoints, tmp_path):
    hf, folder = checkpoints["qwen2_untied"]
    model = llm.load_hf(folder)
    out = llm.save_hf(model, tmp_path / "export", source=folder, max_shard_size=60_000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) >= 2 and all((out / s).is_file() for s in shards)
    for f in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"):
        assert (out / f).is_file(), f
    assert not list(tmp_path.glob(".*tmp"))  # the temporary folder was renamed into place
    again = llm.load_hf(out)
    for (p, a), (_, b) in zip(nnx.to_flat_state(nnx.state(model)), nnx.to_flat_state(nnx.state(again))):
        np.testing.assert_array_equal(np.asarray(a[...]), np.asarray(b[...]), err_msg=str(p))
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    for k, v in hf.state_dict().items():
        assert torch.equal(reloaded.state_dict()[k], v), k
    assert llm.load_tokenizer(out).apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    with pytest.raises(FileExistsError):
        llm.save_hf(model, out)


def test_tied_bfloat16_export(checkpoints, tmp_path):
    hf, folder = checkpoints["qwen2_tied"]
    model = llm.load_hf(folder, dtype="bfloat16")
    assert model.model.layers[0].self_attn.q_proj.kernel[...].dtype == jnp.bfloat16
    out = llm.save_hf(model, tmp_path / "bf16", source=folder)
    f = llm.SafetensorsFile(out / "model.safetensors")
    assert "lm_head.weight" not in f.keys() and f.dtype("model.embed_tokens.weight") == jnp.bfloat16
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert reloaded.dtype == torch.bfloat16
    for k, v in hf.state_dict().items():
        assert torch.equal(reloaded.state_dict()[k], v.to(torch.bfloat16)), k
    # bfloat16 compute stays close to float32 and generation runs.
    ids = _ids()
    ref = _torch_logits(hf, ids)
    ours = _logits(model, ids)
    assert np.abs(ours - ref).max() < 0.1 * np.abs(ref).max()
    toks, _ = llm.generate(model, ids, max_new_tokens=4)
    assert toks.shape == (2, 4)


def test_import_errors_name_the_problem(checkpoints, tmp_path):
    _, folder = checkpoints["qwen2_tied"]
    src = llm.SafetensorsFile(folder / "model.safetensors")
    tensors = {k: np.array(src.array(k)) for k in src.keys()}

    def variant(name, tensors=None, config=None):
        d = tmp_path / name
        d.mkdir()
        shutil.copy(folder / "config.json", d / "config.json")
        if config is not None:
            (d / "config.json").write_text(json.dumps(config))
        if tensors is not None:
            llm.write_safetensors(d / "model.safetensors", tensors)
        return d

    missing = {k: v for k, v in tensors.items() if k != "model.layers.1.mlp.up_proj.weight"}
    with pytest.raises(CheckpointError, match=r"missing tensors \(1\): model.layers.1.mlp.up_proj.weight"):
        llm.load_hf(variant("missing", missing))
    extra = {**tensors, "model.layers.2.mlp.up_proj.weight": tensors["model.layers.1.mlp.up_proj.weight"]}
    with pytest.raises(CheckpointError, match=r"unexpected tensors \(1\): model.layers.2.mlp.up_proj.weight"):
        llm.load_hf(variant("unexpected", extra))
    bad = {**tensors, "model.norm.weight": np.ones(63, np.float32)}
    with pytest.raises(CheckpointError, match=r"model.norm.weight in model.safetensors has shape \[63\], expected \[64\]"):
        llm.load_hf(variant("shape", bad))
    cfg = json.loads((folder / "config.json").read_text())
    with pytest.raises(llm.UnsupportedModelError, match="config.json.*gemma"):
        llm.load_hf(variant("arch", tensors, {**cfg, "model_type": "gemma", "architectures": ["GemmaForCausalLM"]}))
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        llm.load_hf(variant("empty"))
    index = variant("index")
    (index / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "model-00001-of-00002.safetensors"}}))
    with pytest.raises(CheckpointError, match="model-00001-of-00002.safetensors.*missing"):
        llm.load_hf(index)
    trunc = variant("trunc")
    (trunc / "model.safetensors").write_bytes((folder / "model.safetensors").read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="model.safetensors"):
        llm.load_hf(trunc)


def test_safetensors_writer_is_readable_by_the_safetensors_library(tmp_path):
    from safetensors import safe_open

    arrays = {"a": np.arange(6, dtype=np.float32).reshape(2, 3),
              "b": np.linspace(-2, 2, 5).astype(jnp.bfloat16), "c": np.arange(3, dtype=np.int64)}
    llm.write_safetensors(tmp_path / "x.safetensors", arrays)
    with safe_open(tmp_path / "x.safetensors", framework="pt") as f:
        assert f.metadata() == {"format": "pt"}
        assert torch.equal(f.get_tensor("a"), torch.arange(6, dtype=torch.float32).reshape(2, 3))
        assert torch.equal(f.get_tensor("b"), torch.linspace(-2, 2, 5, dtype=torch.float64).to(torch.bfloat16))
    ours = llm.SafetensorsFile(tmp_path / "x.safetensors")
    for k, v in arrays.items():
        np.testing.assert_array_equal(ours.array(k), v)


# ------------------------------------------------------------------------------------------ sharding
def test_sharded_load_matches_single_device(checkpoints):
    assert jax.device_count() >= 8
    _, folder = checkpoints["qwen2_untied"]
    single = llm.load_hf(folder)
    mesh = llm.make_mesh(data=2, fsdp=2, tensor=2)
    sharded = llm.load_hf(folder, mesh=mesh)
    q = sharded.model.layers[0].self_attn.q_proj.kernel[...]
    assert q.sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor")
    assert {s.data.shape for s in q.addressable_shards} == {(32, 32)}  # each device holds a quarter
    assert sharded.model.embed_tokens.embedding[...].sharding.spec == jax.sharding.PartitionSpec("tensor", "fsdp")
    ids = _ids(batch=4)
    with jax.set_mesh(mesh):
        x = jax.device_put(jnp.asarray(ids), llm.batch_sharding(mesh, 2, 4))
        logits = jax.jit(lambda m, x: m(x))(sharded, x)
    np.testing.assert_allclose(np.asarray(logits), _logits(single, ids), atol=1e-5)
    # An in-memory model can be moved onto the mesh too.
    moved = llm.shard_model(llm.create_model(llm.tiny_config()), mesh)
    assert moved.model.layers[1].mlp.down_proj.kernel[...].sharding.spec == jax.sharding.PartitionSpec("tensor", "fsdp")


# ---------------------------------------------------------------------------------------------- LoRA
def test_lora_train_merge_and_export(checkpoints, tmp_path):
    hf, folder = checkpoints["llama"]
    model = llm.load_hf(folder)
    ids = jnp.asarray(_ids())
    base = _logits(model, ids)
    llm.apply_lora(model, llm.LoRAConfig(rank=4, alpha=8, target_modules=r".*\.(q_proj|v_proj|down_proj)"))
    np.testing.assert_allclose(_logits(model, ids), base, atol=1e-6)  # b = 0: starts at the base model
    with pytest.raises(ValueError, match="matches no projection"):
        llm.apply_lora(model, llm.LoRAConfig(target_modules=r"nothing"))

    # One optimiser step trains only the adapters, through either mask.
    def loss_fn(m):
        logits = m(ids[:, :-1])
        return optax.softmax_cross_entropy_with_integer_labels(logits, ids[:, 1:]).mean()

    before = jax.tree.map(np.asarray, nnx.state(model, nnx.Param))
    opt = nnx.Optimizer(model, llm.freeze_except(optax.adam(1e-2)), wrt=nnx.Param)
    opt.update(model, jax.jit(nnx.grad(loss_fn))(model))
    after = nnx.state(model, nnx.Param)
    mask = llm.trainable_mask(after)
    changed = jax.tree.map(lambda a, b: bool((np.asarray(a) != b).any()), after, before)
    names = [llm.sharding.path_name(p) for p, _ in jax.tree_util.tree_leaves_with_path(after)]
    moved = {n for n, c in zip(names, jax.tree.leaves(changed)) if c}
    trainable = {n for n, m in zip(names, jax.tree.leaves(mask)) if m}
    # Frozen weights stay bit-identical; every b moves (a's first gradient is 0 because b starts at 0).
    assert moved == {n for n in trainable if n.endswith(".lora.b")} and len(trainable) == 2 * 3 * 2
    attn = model.model.layers[0].self_attn
    v_b, q_a = np.asarray(attn.v_proj.lora.b[...]), np.asarray(attn.q_proj.lora.a[...])
    only_q = llm.trainable_filter([r".*q_proj\.lora\..*"])
    opt2 = nnx.Optimizer(model, optax.sgd(1e-1), wrt=only_q)
    graphdef, train_params, rest = nnx.split(model, only_q, ...)
    grads = jax.jit(jax.grad(lambda p: loss_fn(nnx.merge(graphdef, p, rest))))(train_params)
    opt2.update(model, grads)
    np.testing.assert_array_equal(np.asarray(attn.v_proj.lora.b[...]), v_b)
    assert (np.asarray(attn.q_proj.lora.a[...]) != q_a).any()

    unmerged = _logits(model, ids)
    assert np.abs(unmerged - base).max() > 1e-3  # the step moved the model
    out = llm.save_hf(model, tmp_path / "lora", source=folder)  # merges on the fly, model unchanged
    assert model.model.layers[0].self_attn.q_proj.lora is not None
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert np.abs(_torch_logits(reloaded, np.asarray(ids)) - unmerged).max() <= 1e-4
    llm.merge_lora(model)
    assert model.model.layers[0].self_attn.q_proj.lora is None
    np.testing.assert_allclose(_logits(model, ids), unmerged, atol=1e-5)


def test_lora_dropout_only_in_train_mode():
    model = llm.create_model(llm.tiny_config(num_hidden_layers=1))
    llm.apply_lora(model, llm.LoRAConfig(rank=2, dropout=0.5, target_modules=r".*q_proj"))
    lora = model.model.layers[0].self_attn.q_proj.lora
    lora.b[...] = jnp.ones_like(lora.b[...])
    ids = jnp.asarray(_ids(length=6))
    a, b = _logits(model, ids), _logits(model, ids)
    np.testing.assert_array_equal(a, b)  # inference: dropout is off
    model.train()
    assert np.abs(_logits(model, ids) - a).max() > 1e-4
    model.eval()
    np.testing.assert_array_equal(_logits(model, ids), a)


# ------------------------------------------------------------------------------------------ tokenizer
def test_tiny_tokenizer_chat_template_and_folder_round_trip(tiny_tokenizer, tmp_path):
    text = tiny_tokenizer.apply_chat_template([{"role": "user", "content": "Grade? <image>"}], tokenize=False,
                                              add_generation_prompt=True)
    assert text == ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nGrade? <image>"
                    "<|im_end|>\n<|im_start|>assistant\n")
    image_id = tiny_tokenizer.convert_tokens_to_ids("<image>")
    assert tiny_tokenizer("a <image> b")["input_ids"].count(image_id) == 1
    assert len(tiny_tokenizer) <= VOCAB and tiny_tokenizer.pad_token == "<|endoftext|>"
    tiny_tokenizer.save_pretrained(tmp_path)
    again = llm.load_tokenizer(tmp_path)
    assert again.apply_chat_template([{"role": "user", "content": "x"}], tokenize=False) == \
        tiny_tokenizer.apply_chat_template([{"role": "user", "content": "x"}], tokenize=False)
    assert set(llm.stop_token_ids(again)) == {tiny_tokenizer.convert_tokens_to_ids("<|im_end|>")}
    with pytest.raises(FileNotFoundError, match="tokenizer"):
        llm.load_tokenizer(tmp_path / "nowhere")


def test_generate_command(checkpoints, tmp_path, capsys):
    from sparsewsi.cli import main

    _, folder = checkpoints["qwen2_tied"]
    rc = main(["generate", "--model", str(folder), "--prompt", "Describe the slide.", "--prompt", "Grade?",
               "--max-new-tokens", "4", "--dtype", "float32", "--fsdp", "2"])
    out = capsys.readouterr().out
    assert rc == 0 and ">>> Describe the slide." in out and ">>> Grade?" in out
    assert main(["generate", "--model", str(tmp_path / "absent"), "--prompt", "x"]) == 2
    assert "absent" in capsys.readouterr().err
