r"""Tiny SparseWSI run on CPU in minutes: random tiny LLM, built-in tokenizer, synthetic slide QA.

    sparsewsi train --config configs/tiny.py --workdir runs/tiny
    sparsewsi train --config configs/tiny.py:steps=40 --workdir runs/tiny --config.optim.lr=3e-3

Arguments (``configs/tiny.py:key=value,...``): ``steps`` (total steps), ``stage`` (1: LLM frozen,
2: LoRA on the LLM), ``cap`` (training-time candidate cap M, 0 = off).
"""

import ml_collections

from sparsewsi.config_args import parse_arg


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    a = parse_arg(arg)
    stage = int(a.get("stage", 2))
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.total_steps = int(a.get("steps", 200))
    c.batch_size = 8
    c.log_every = 1
    c.progress = True
    c.tensorboard = True

    c.model = ml_collections.ConfigDict(dict(
        feature_dim=32, k=8, candidate_cap=int(a.get("cap", 0)), scorer_kind="mlp", scorer_hidden=64,
        scorer_depth=2, scorer_heads=4, tau_start=2.0, tau_end=0.1, tau_steps=100, denoiser=True,
        projector_hidden=64, llm_seed=0, seed=0))
    c.llm = ml_collections.ConfigDict(dict(path=None, tokenizer=None, dtype="float32", param_dtype="float32",
                                           tiny=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2)))
    c.lora = ml_collections.ConfigDict(dict(rank=8 if stage == 2 else 0, alpha=16.0, targets=None))
    c.optim = ml_collections.ConfigDict(dict(
        lr=3e-3, warmup_steps=10, end_lr_ratio=0.1, weight_decay=0.0, clip_norm=1.0, accumulate_steps=1,
        # First match decides: None = frozen, a float scales the learning rate.
        param_groups=[(r".*\.lora\..*", 1.0), (r"llm\..*", None), (r".*", 1.0)] if stage == 2
        else [(r"llm\..*", None), (r".*", 1.0)]))
    c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))
    c.checkpoint = ml_collections.ConfigDict(dict(every=50, keep=3, async_save=True))
    c.data = ml_collections.ConfigDict(dict(
        source="synthetic", num_examples=64, num_tokens=64, evidence_tokens=4, num_classes=4, seed=0,
        # For source="tfds" (data_pipelines): see configs/stage2_vqa.py.
        name="", data_dir="", split="train", features_root="", max_tokens=0, max_text_tokens=0))
    return c
