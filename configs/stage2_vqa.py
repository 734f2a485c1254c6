r"""Stage 2: VQA instruction tuning on SlideInstruction with LoRA (default) or the full LLM.

Starts from stage 1's scorer / denoiser / projector (``init`` = a stage-1 workdir) and trains them
together with LoRA rank 64 / alpha 128 on every attention and MLP projection (lr 2e-4), or with the
whole LLM unfrozen (``full``: lr 2e-5). AdamW, warm-up + cosine, clip 1.0.

    sparsewsi train --config configs/stage2_vqa.py:llm=/models/Qwen2.5-7B-Instruct,data=/data/tfds/slide_instruction/stage2/1.0.0,init=runs/stage1 \
        --workdir runs/stage2
    sparsewsi train --config configs/stage2_vqa.py:full,llm=...,data=... --workdir runs/stage2_full --set mesh.fsdp=8
    sbatch launch/slurm_gpu.sbatch configs/stage2_vqa.py:llm=...,data=...,init=runs/stage1 runs/stage2

Arguments: ``llm``, ``data``, ``features_root``, ``init`` (stage-1 workdir whose trained scorer /
denoiser / projector start this run), ``full`` (train the whole LLM), ``cap``, ``runlocal``.
"""

import ml_collections

from sparsewsi.config_args import parse_arg


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    a = parse_arg(arg)
    full = "full" in a
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.total_steps = 12000
    c.batch_size = 32
    c.log_every = 10
    c.progress = True
    c.tensorboard = True
    c.init_from = a.get("init", "")
    c.model = ml_collections.ConfigDict(dict(
        feature_dim=512, k=32, candidate_cap=int(a.get("cap", 4096)), scorer_kind="mlp", scorer_hidden=1024,
        scorer_depth=2, scorer_heads=16, tau_start=2.0, tau_end=0.1, tau_steps=2000, denoiser=True,
        projector_hidden=0, llm_seed=0, seed=0))
    # Mixed precision: bfloat16 compute, float32 weights (LoRA adapters take the kernels' dtype, and
    # AdamW on bfloat16 weights loses small updates); FSDP spreads the float32 copy over the devices.
    c.llm = ml_collections.ConfigDict(dict(path=a.get("llm"), tokenizer=None, dtype="bfloat16",
                                           param_dtype="float32", tiny={}))
    c.lora = ml_collections.ConfigDict(dict(rank=0 if full else 64, alpha=128.0, targets=None))
    c.optim = ml_collections.ConfigDict(dict(
        lr=2e-5 if full else 2e-4, warmup_steps=300, end_lr_ratio=0.0, weight_decay=0.0, clip_norm=1.0,
        accumulate_steps=1,
        # new modules at 10x the LLM rate when the LLM is fully unfrozen (SlideChat's 1e-3 vs ~1e-4 ratio)
        param_groups=[(r"llm\..*", 1.0), (r".*", 10.0)] if full
        else [(r".*\.lora\..*", 1.0), (r"llm\..*", None), (r".*", 1.0)]))
    c.mesh = ml_collections.ConfigDict(dict(data=1, fsdp=-1, tensor=1))
    c.checkpoint = ml_collections.ConfigDict(dict(every=500, keep=3, async_save=True))
    c.data = ml_collections.ConfigDict(dict(
        source="tfds", path=a.get("data", ""), split="train", features_root=a.get("features_root", ""),
        max_patches=10_240, patch_buckets=(), token_buckets=(), worker_count=4, fixed_shapes=False,
        num_examples=0, num_tokens=0, evidence_tokens=0, num_classes=0))
    if "runlocal" in a:
        c.total_steps, c.batch_size, c.log_every = 20, 2, 1
        c.model.update(feature_dim=32, k=8, candidate_cap=32, scorer_hidden=64, projector_hidden=64, tau_steps=10)
        c.llm.update(path=None, dtype="float32", param_dtype="float32",
                     tiny=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2))
        c.lora.rank = 0 if full else 8
        c.optim.warmup_steps = 2
        c.checkpoint.every = 10
        c.mesh.update(data=-1, fsdp=1, tensor=1)
        c.data.update(source="synthetic", num_examples=32, num_tokens=64, evidence_tokens=4, num_classes=4,
                      seed=0, worker_count=0)
    return c
