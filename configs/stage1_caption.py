r"""Stage 1: caption alignment on SlideInstruction captions with the LLM frozen.

Trains the scorer, the denoiser and the projector (lr 1e-3) with Soft Top-K (k = 32, tau 2.0 -> 0.1
over 2,000 steps), VP noise gate and diagonal denoiser; the LLM (Qwen2.5-7B-Instruct) is frozen.

    python -m data_pipelines.build slide_instruction --config stage1 --source train=SlideInstruction_train.json \
        --features-root /data/slideinstruct_conch --data-dir /data/tfds
    sparsewsi train --config configs/stage1_caption.py:llm=/models/Qwen2.5-7B-Instruct,data=/data/tfds/slide_instruction/stage1/1.0.0 \
        --workdir runs/stage1
    bash launch/tpu_pod.sh my-tpu us-central2-b configs/stage1_caption.py:llm=...,data=... runs/stage1

Arguments (``:key=value,...``): ``llm`` (Hugging Face folder), ``data`` (prepared dataset path),
``features_root`` (where the feature files are now), ``cap`` (training candidate cap M, default 4096),
``runlocal`` (tiny shapes for a smoke test of the same code path).
"""

import ml_collections

from sparsewsi.config_args import parse_arg


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    a = parse_arg(arg)
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.total_steps = 8000
    c.batch_size = 64
    c.log_every = 10
    c.progress = True
    c.tensorboard = True
    c.model = ml_collections.ConfigDict(dict(
        feature_dim=512, k=32, candidate_cap=int(a.get("cap", 4096)), scorer_kind="mlp", scorer_hidden=1024,
        scorer_depth=2, scorer_heads=16, tau_start=2.0, tau_end=0.1, tau_steps=2000, denoiser=True,
        projector_hidden=0, llm_seed=0, seed=0))
    c.llm = ml_collections.ConfigDict(dict(path=a.get("llm"), tokenizer=None, dtype="bfloat16",
                                           param_dtype="bfloat16", tiny={}))
    c.lora = ml_collections.ConfigDict(dict(rank=0, alpha=128.0, targets=None))
    c.optim = ml_collections.ConfigDict(dict(
        lr=1e-3, warmup_steps=200, end_lr_ratio=0.0, weight_decay=0.0, clip_norm=1.0, accumulate_steps=1,
        param_groups=[(r"llm\..*", None), (r".*", 1.0)]))
    c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))
    c.checkpoint = ml_collections.ConfigDict(dict(every=500, keep=3, async_save=True))
    c.data = ml_collections.ConfigDict(dict(
        source="tfds", path=a.get("data", ""), split="train", features_root=a.get("features_root", ""),
        max_patches=10_240, patch_buckets=(), token_buckets=(), worker_count=4, fixed_shapes=False,
        num_examples=0, num_tokens=0, evidence_tokens=0, num_classes=0))
    if "runlocal" in a:  # same code path, shapes that run on a laptop CPU
        c.total_steps, c.batch_size, c.log_every = 20, 2, 1
        c.model.update(feature_dim=32, k=8, candidate_cap=32, scorer_hidden=64, projector_hidden=64, tau_steps=10)
        c.llm.update(path=None, dtype="float32", param_dtype="float32",
                     tiny=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2))
        c.optim.warmup_steps = 2
        c.checkpoint.every = 10
        c.data.update(source="synthetic", num_examples=32, num_tokens=64, evidence_tokens=4, num_classes=4,
                      seed=0, worker_count=0)
    return c
