"""TFDS builders and the grain pipeline on the real dataset files with small generated feature bags."""

import collections
import json
import pathlib

import h5py
import numpy as np
import pytest

from data_pipelines.build import build
from data_pipelines.builders import StaleDatasetError
from data_pipelines.pipeline import BAD_REASONS, InputPipeline, PipelineConfig
from sparsewsi.llm import IMAGE_TOKEN
from sparsewsi.datasets import read_wsi_vqa

D = 16  # feature width of the generated bags (real CONCH bags are 512)
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def tiny_tokenizer():
    """A byte-level BPE with the Qwen chat specials and <image>, trained here in milliseconds."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", IMAGE_TOKEN]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    corpus = ["what is the tumour type? invasive ductal carcinoma positive negative grade A. B. C. D."] * 20
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=400, special_tokens=specials,
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<|endoftext|>", eos_token="<|im_end|>",
                                   additional_special_tokens=["<|im_start|>", IMAGE_TOKEN])
    fast.chat_template = CHAT_TEMPLATE
    return fast


def _h5(path, n, seed, bad=None):
    rng = np.random.default_rng(seed)
    feats = rng.normal(size=(n, D)).astype(np.float32)
    if bad == "nan":
        feats[1, 2] = np.nan
    width = D + 1 if bad == "wide" else D
    with h5py.File(path, "w") as f:
        f["features"] = feats if width == D else np.zeros((n, width), np.float32)
        f["coords"] = np.stack([np.arange(n) * 224, np.arange(n) * 448], 1).astype(np.int64)


def _csv(path, n, seed):
    rng = np.random.default_rng(seed)
    feats = rng.normal(size=(n, D))
    lines = [",".join([str(i) for i in range(D)] + ["name"])]
    lines += [",".join([f"{v:.5f}" for v in row] + [f"{i}_{2 * i}.jpg"]) for i, row in enumerate(feats)]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def wsivqa(shared_data, tmp_path_factory):
    """WSI-VQA train+val built over per-slide h5 bags named by full slide barcode (prefix lookup)."""
    root = tmp_path_factory.mktemp("wsivqa_feats")
    ids = sorted({r.slide_id for f in ("WsiVQA_train.json", "WsiVQA_val.json") for r in read_wsi_vqa(shared_data / f).records})
    for k, pid in enumerate(ids):
        _h5(root / f"{pid}-01Z-00-DX1.h5", n=20 + (k * 37) % 300, seed=k)
    data_dir = tmp_path_factory.mktemp("tfds")
    builder = build("wsi_vqa", {"train": shared_data / "WsiVQA_train.json", "validation": shared_data / "WsiVQA_val.json"},
                    features_root=root, data_dir=data_dir, feature_dim=D, csv_feature_columns=D)
    return builder, root, ids


def test_bcnb_build_counts_and_bad_items(shared_data, tmp_path):
    root = tmp_path / "bcnb"
    root.mkdir()
    for i in range(1, 1059):
        if i == 5:
            continue  # missing
        _h5(root / f"{i}.h5", n=4 + i % 7, seed=i, bad={7: "nan", 9: "wide"}.get(i))
    builder = build("slidebench_vqa", shared_data / "SlideBench-VQA-BCNB.csv", features_root=root,
                    data_dir=tmp_path / "tfds", feature_dim=D, csv_feature_columns=D)
    assert builder.builder_config.name == "bcnb"
    meta = builder.info.metadata["sources"]["test"]
    assert meta["sha256"] == "10b83c6177bd13bee9471fb0bd54b7d500e7eccdb7e52b462424ed50cb259e0b"
    # patients 5, 7, 9 have 7 questions each (6 for those without a grading question)
    assert meta["num_rows"] == 7274 and meta["kept"] + sum(meta["skipped"].values()) == 7274
    assert set(meta["skipped"]) == {"feature_file_missing", "feature_non_finite", "feature_wrong_width"}
    report = json.loads((pathlib.Path(str(builder.data_path)) / "build_report.json").read_text())
    problems = report["test"]["problems"]
    assert all(p["row"] > 0 and p["id"] and p["reason"] for p in problems) and len(problems) == 7274 - meta["kept"]
    src = builder.as_data_source()["test"]
    assert len(src) == meta["kept"]
    tasks = collections.Counter(src[i]["task"].decode() for i in range(len(src)))
    assert sum(tasks.values()) == meta["kept"] and len(tasks) == 7
    ex = src[0]
    assert ex["assistant_turns"][0].decode().startswith(ex["answer_letter"].decode() + ". ")
    assert builder.info.metadata["build"]["feature_dim"] == D
    # Rerun reuses the finished build; another source file under the same data_dir is refused.
    again = build("slidebench_vqa", shared_data / "SlideBench-VQA-BCNB.csv", features_root=root,
                  data_dir=tmp_path / "tfds", feature_dim=D, csv_feature_columns=D)
    assert again.build_report == {}
    other = tmp_path / "other.csv"
    other.write_text("ID,Slide,Task,Question,A,B,C,D,Answer\n1,1,ER,q?,Positive,Negative,,,A\n")
    with pytest.raises(StaleDatasetError, match="sha256"):
        build("slidebench_vqa", other, features_root=root, data_dir=tmp_path / "tfds", feature_dim=D, csv_feature_columns=D)
    rebuilt = build("slidebench_vqa", other, features_root=root, data_dir=tmp_path / "tfds", feature_dim=D,
                    csv_feature_columns=D, overwrite=True)
    assert len(rebuilt.as_data_source()["test"]) == 1


def test_caption_and_instruction_with_slidechat_csv_layout(shared_data, tmp_path):
    from sparsewsi.datasets import read_slidebench_caption

    root = tmp_path / "feats"
    caps = read_slidebench_caption(shared_data / "SlideBench-Caption-TCGA.csv").records
    for k, r in enumerate(caps):
        _csv(root / r.tumor / f"{r.slide_id}.csv", n=3 + k % 4, seed=k)
    for k, name in enumerate(["TCGA-A7-A0CJ-01Z-00-DX2", "TCGA-AR-A255-01Z-00-DX1"]):
        _csv(root / "BRCA" / f"{name}.csv", n=5, seed=k)
    cap = build("slidebench_caption", shared_data / "SlideBench-Caption-TCGA.csv", features_root=root,
                data_dir=tmp_path / "tfds", feature_dim=D, csv_feature_columns=D)
    assert cap.info.metadata["sources"]["test"]["kept"] == 734
    ins = build("slide_instruction", shared_data / "slideinstruct_train_example.json", features_root=root,
                data_dir=tmp_path / "tfds", config="stage2", feature_dim=D, csv_feature_columns=D)
    meta = ins.info.metadata["sources"]["train"]
    assert (meta["kept"], meta["skipped"]) == (2, {"feature_file_missing": 1})
    src = ins.as_data_source()["train"]
    assert {src[i]["feature_file"].decode().split("/")[0] for i in range(2)} == {"BRCA"}


def test_wsivqa_build_counts(wsivqa, shared_data):
    builder, _, _ = wsivqa
    meta = builder.info.metadata["sources"]
    assert (meta["train"]["kept"], meta["validation"]["kept"]) == (7139, 798)
    assert meta["train"]["counts"]["answer_not_among_choices"] == 29
    assert (meta["validation"]["counts"]["closed"], meta["validation"]["counts"]["open"]) == (421, 377)


def _cfg(**kw):
    base = dict(batch_size=8, max_patches=256, patch_buckets=(64, 128, 256), token_buckets=(64, 128, 256, 512, 1024),
                feature_dim=D, csv_feature_columns=D, seed=3, num_epochs=1, read_threads=2, drop_remainder=False)
    base.update(kw)
    return PipelineConfig(**base)


def _records(data_path, split):
    from data_pipelines.pipeline import PreparedSource

    src = PreparedSource(data_path, split)
    return [src[i] for i in range(len(src))]


def _take(it, k):
    return [next(it) for _ in range(k)]


def test_batches_masks_and_determinism(wsivqa, tok):
    builder, _, _ = wsivqa
    pipe = InputPipeline(builder.data_path, "validation", tok, _cfg(), shard_index=0, shard_count=1)
    a, b = _take(iter(pipe), 3), _take(iter(pipe), 3)
    for x, y in zip(a, b):
        assert x.keys() == y.keys() and all(np.array_equal(x[k], y[k]) for k in x)
    other = _take(iter(InputPipeline(builder.data_path, "validation", tok, _cfg(seed=4), shard_index=0, shard_count=1)), 1)
    assert not np.array_equal(other[0]["record_index"], a[0]["record_index"])
    batch = a[0]
    bsz, nb, d = batch["features"].shape
    assert bsz == 8 and d == D and nb in (64, 128, 256) and batch["input_ids"].shape[1] in (64, 128, 256, 512, 1024)
    assert batch["example_valid"].all()
    n = batch["feature_mask"].sum(1)
    assert (n == np.minimum(batch["num_patches"], 256)).all()
    assert (batch["features"][~batch["feature_mask"]] == 0).all()
    src = pipe.source
    image_id = tok.convert_tokens_to_ids(IMAGE_TOKEN)
    for i in range(bsz):
        ids, loss = batch["input_ids"][i], batch["loss_mask"][i]
        assert ids[batch["image_position"][i]] == image_id and (ids == image_id).sum() == 1
        rec = src[int(batch["record_index"][i])]
        target = tok.decode(ids[loss], skip_special_tokens=False)
        assert target.strip() == rec["assistant_turns"][0] + "<|im_end|>"
        assert not loss[: batch["image_position"][i] + 1].any()
    # a capped bag keeps evenly spaced patches in order (coords are 224 * patch index)
    big = np.flatnonzero(batch["num_patches"] > 256)
    for i in big:
        xs = batch["coords"][i, :256, 0] // 224
        assert (np.diff(xs) > 0).all() and xs[0] == 0


def test_two_hosts_disjoint_and_covering(wsivqa, tok):
    builder, _, _ = wsivqa
    seen = []
    for host in (0, 1):
        pipe = InputPipeline(builder.data_path, "validation", tok, _cfg(batch_size=32), shard_index=host, shard_count=2)
        seen.append(np.concatenate([b["record_index"] for b in iter(pipe)]))
    assert not set(seen[0]) & set(seen[1])
    assert sorted(np.concatenate(seen)) == list(range(798))
    assert len(seen[0]) == len(set(seen[0]))


def test_restore_continues_with_exact_next_batch(wsivqa, tok):
    builder, _, _ = wsivqa
    pipe = InputPipeline(builder.data_path, "train", tok, _cfg(num_epochs=None), shard_index=1, shard_count=2)
    ref = _take(iter(pipe), 6)
    it = iter(pipe)
    _take(it, 3)
    state = json.loads(json.dumps(it.get_state()))  # survives a JSON checkpoint
    resumed = iter(pipe)
    resumed.set_state(state)
    for want in ref[3:]:
        got = next(resumed)
        assert all(np.array_equal(got[k], want[k]) for k in want)
    assert resumed.batches == 6


def test_bad_feature_files_at_read_time_are_counted_not_fatal(wsivqa, tok, tmp_path):
    builder, root, ids = wsivqa
    # a copy of the features root where some files went missing or bad after the build
    moved = tmp_path / "feats"
    moved.mkdir()
    val_ids = sorted({pipe_rec["slide_id"] for pipe_rec in _records(builder.data_path, "validation")})
    gone, nan = val_ids[0], val_ids[1]
    for k, pid in enumerate(ids):
        if pid == gone:
            continue
        _h5(moved / f"{pid}-01Z-00-DX1.h5", n=10, seed=k, bad="nan" if pid == nan else None)
    pipe = InputPipeline(builder.data_path, "validation", tok, _cfg(batch_size=64), features_root=moved,
                         shard_index=0, shard_count=1)
    it = iter(pipe)
    batches = list(it)
    valid = np.concatenate([b["example_valid"] for b in batches])
    assert len(valid) == 798
    recs = [pipe.source[i] for i in range(798)]
    want_missing = sum(r["slide_id"] == gone for r in recs)
    want_nan = sum(r["slide_id"] == nan for r in recs)
    assert want_missing + want_nan > 0
    assert it.skipped == collections.Counter({k: v for k, v in
                                              {"feature_missing": want_missing, "feature_non_finite": want_nan}.items() if v})
    assert (~valid).sum() == want_missing + want_nan
    for b in batches:
        bad = ~b["example_valid"]
        assert not b["feature_mask"][bad].any() and not b["loss_mask"][bad].any()
        assert set(BAD_REASONS[c] for c in b["bad_reason"][bad]) <= {"feature_missing", "feature_non_finite"}


def test_reader_workers_are_deterministic(wsivqa, tok):
    """With reader processes the order depends on (seed, shard, worker_count) only: reruns match."""
    builder, _, _ = wsivqa
    cfg = _cfg(batch_size=16, worker_count=2)
    runs = [_take(iter(InputPipeline(builder.data_path, "validation", tok, cfg, shard_index=0, shard_count=1)), 3)
            for _ in range(2)]
    for x, y in zip(*runs):
        assert all(np.array_equal(x[k], y[k]) for k in x) and x["example_valid"].all()
    assert len(set(np.concatenate([b["record_index"] for b in runs[0]]))) == 48


def test_multiple_choice_reply_styles():
    from data_pipelines import examples as ex
    from sparsewsi.datasets.records import MultipleChoiceQuestion
    import dataclasses

    fields = {f.name for f in dataclasses.fields(MultipleChoiceQuestion)}
    values = dict(question_id="q1", row=2, dataset="d", slide_id="S1", question="Which?",
                  options={"A": "alpha", "B": "beta"}, answer="B", answer_text="beta", tumor="T",
                  broad_category="b", narrow_category="n", task="t")
    q = MultipleChoiceQuestion(**{k: v for k, v in values.items() if k in fields})
    assert ex.from_multiple_choice(q)["assistant_turns"] == ["B. beta"]
    assert ex.from_multiple_choice(q, "letter")["assistant_turns"] == ["B"]
    with pytest.raises(ValueError, match="reply"):
        ex.from_multiple_choice(q, "text")
