r"""The end-to-end demo (``sparsewsi demo``): synthetic slides -> features -> SparseLearn -> evaluation.

    sparsewsi demo                                  # the full run into runs/demo (9-13 min on 2 CPU cores)
    sparsewsi demo --config configs/demo.py:small   # a few slides, a few steps (minutes; plumbing only)
    sparsewsi demo --config.num_slides=80 --config.train.total_steps=300 --out runs/demo80

Arguments (``configs/demo.py:arg``): ``small`` (a shrunken run for smoke tests).

Fields: top level (``seed``, ``num_slides``, ``test_fraction``) decide the benchmark together with
``slides.*`` (fields of :class:`sparsewsi.demo.synthetic_slides.BenchmarkConfig`); ``extract.*``
the feature extraction (``sparsewsi extract`` settings, on the slides' design grid); ``dataset.*``
the training questions; ``align.*`` the alignment stage (region bags, before SparseLearn); ``train``
is a complete trainer config (as ``configs/tiny.py``) whose
``data`` block the demo fills in; ``polish.*`` the reader's fine-tuning on the Hard Top-K after
SparseLearn; ``eval.*`` the selectors compared at budget ``k``; ``report.*``
the pictures. Every field can be overridden on the command line as ``--config.<field>=<value>``.
"""

import ml_collections

from sparsewsi.config_args import parse_arg


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    a = parse_arg(arg)
    c = ml_collections.ConfigDict()
    c.seed = 0
    # 480 slides (360 train): with 88 training slides an LLM shown every evidence patch (+ random fill)
    # fit its training batches (loss 0.001) but answered 50% on held-out slides and 52% on its own
    # training slides with other random fills: it recognised slides instead of reading the evidence.
    c.num_slides = 480
    c.test_fraction = 0.25
    c.workers = 2  # processes drawing slides
    c.progress = True

    # The benchmark (BenchmarkConfig fields besides num_slides / seed / test_fraction).
    c.slides = ml_collections.ConfigDict(dict(
        patch_size=112, target_mpp=0.5, mpp=0.5, tissue_patches=(300, 360), max_foci=3, distractors=(3, 6),
        max_evidence_fraction=0.01, focus_size=(0.75, 0.85), svs_every=4, tile=256, jpeg_quality=85,
        # One identification question per slide, options in one fixed order (as SlideBench-BCNB lists
        # a task's options): with shuffled options the tiny LLM must also match option words to what
        # it sees, and with the counting question mixed in it learned to read far more slowly.
        option_order="fixed", questions=("kind",),
        # Three evidence kinds and "none of these", the answer of evidence-free slides (look-alikes only).
        # With all four kinds and one on every slide, the reader named the last kind by elimination (shown
        # random tokens it answered "signet-ring" on 90% of the slides), so finding that kind never paid and
        # the scorer left it out: signet-ring recall@32 0.17 (0.46 in another run), the other kinds 0.67-1.00.
        # Turning the giant-cell slides into evidence-free ones (same features, one seed): signet-ring recall
        # 0.17 -> 0.64, accuracy 80.8 -> 86.7%. The giant cell, the kind found most easily, is the one left out
        # (SlideBench questions have at most four options).
        kinds=("keratin_pearl", "psammoma_body", "signet_ring"), none_option=True))

    # Feature extraction: the real `sparsewsi extract` path on the design grid, with a random-weight tiny ViT at
    # 112 px without LayerScale (`tiny-112-w96`, 96 wide; the measurements in this paragraph are of `tiny-112`, 48
    # wide): 5.4x faster than `tiny` (224 px) on the demo slides (21 s vs 115 s for 120 slides). Linear probes fitted on its training-slide features
    # (an earlier benchmark: four kinds, small adipocytes) told the four evidence kinds apart on 100% of
    # held-out evidence patches and found the evidence with top-32 recall 0.96-0.99 (by normalisation).
    # Told apart from every look-alike and from plain tissue too (nine classes, slide-normalised x and
    # log1p(x^2)), signet-ring patches are the hard ones: 71% correct, 10 of 58 taken for adipocytes,
    # which were drawn at signet-cell scale; with adipocytes drawn as large fat cells, 81% (vessels now).
    # `slide_workers`: slides extracted at once (threads sharing the jitted encoder; a demo slide's own opening, tissue
    # mask, grid and writing are serial Python around ~6 encoder batches). From scratch: 93.4 s wall, 165.7 s CPU with
    # 2, against 97.7 s / 117.1 s one at a time an hour earlier on the same machine, which meanwhile ran ~20% slower
    # (the slides stage: 154 s against 124 s): a gain, of uncertain size.
    # Width 96, not 48 (extraction 58 s for 480 slides, from scratch): the MLP kind probe reading whole test slides by its most confident patch
    # (`python -m sparsewsi.demo.probe --run RUN`, `slide_answers`) answered 90.8% on the 48-wide features, 97.5% on
    # 96 and 99.2% on 192: with 48, look-alikes on 9 of 30 evidence-free slides looked like evidence, and a reader of
    # the learned top 32 (which holds every look-alike) could not get past ~90%. Same slides, default otherwise (this
    # machine): 48 wide, learned / all / oracle 84.2 / 73.3 / 90.0%; 96 wide 81.7 / 80.0 / 95.0% with stage 2 as it
    # was (signet-ring recall@32 0.44), and 89.2 / 88.3 / 92.5% (recall@32 0.972) with more exploration (below);
    # 192 wide 50.0 / 90.0 / 93.3% (stage 2 found keratin only); its extract stage took
    # 217 s against 125 s for 96 wide, the two runs side by side on the 2 cores. With this stage 2 (noise
    # 2.0, scorer x2), 192 wide gave 95.0% (recall@32 0.944) at seed 0 but 73.3% (0.654) and 45.8% (0.269) at seeds
    # 1 and 2 (their readers fine: oracle 94.2, 96.7%), where 96 wide gives 89.2, 90.0, 89.2%: 96 is the default.
    c.extract = ml_collections.ConfigDict(dict(
        encoder="tiny-112-w96", weights="", encoder_seed=0, min_tissue=0.25, batch_size=64, threads=2,
        slide_workers=2, thumbnails=True))

    # Training questions: every training slide's identification question is also asked with its
    # options in `option_orders` further random orders (data augmentation of the training split
    # only; the test questions are the benchmark's own).
    # `reply`: "letter" trains on the answer letter alone (SlideChat's "C. <option>" spreads the loss
    # over ~12 tokens of which only the letter depends on the slide).
    c.dataset = ml_collections.ConfigDict(dict(option_orders=0, reply="letter"))

    # Alignment (the recipe's stage 1, before SparseLearn): the projector and the randomly initialised
    # LLM learn to read visual tokens from region bags (`tokens` patches of a training slide: its
    # evidence patches + random ones, asked the slide's questions). Without it the LLM never learns to
    # read 1-3 evidence tokens among hundreds and the scorer gets no useful gradient. 0 steps = off.
    # Region bags carry their slide's normalisation (see `write_region_bags`): with each bag normalised
    # by its own 32 tokens, the 128-wide reader answered 48% of test slides shown every evidence patch;
    # with the slide's statistics, 95%.
    # Eight random fills per slide: with two, the alignment loss ended higher and noisier (~0.45 vs ~0.25
    # after 300-400 steps, mean/std normalisation; two fills were not retried since).
    # `noise_slots`: pure-noise tokens (gate mask 0) inserted among each region bag's tokens (model option
    # `noise_slots`), as SparseLearn leaves ~350 of a slide's tokens as noise. Measured on test slides
    # (32 random clean tokens + the rest noise, as at the start of stage 2), the reader aligned without them
    # ignored clean evidence (psammoma: loss 0.037 with or without it; keratin 3.0 -> 2.6), with 192 slots
    # it read every kind (loss 0.06-0.12 with the evidence, 0.5-2.4 without). Costs ~150 s.
    # `lookalikes`: every region bag also holds all of its slide's look-alike patches (a random fill
    # rarely draws them), so the reader learns to tell evidence from look-alikes: the squares scorer
    # below selects every atypical patch, look-alikes included, and the reader must then pick.
    # Stage 2 from readers aligned three ways, with the squares scorer (one seed each, learned / oracle %,
    # recall@32): plain 72.5 / 95.0 / 0.57; noise slots 75.0 / 65.0 / 0.85 (the reader, never shown
    # look-alikes, lost psammoma in stage 2); noise slots + look-alikes 80.0 / 90.0 / 0.83 (four kinds).
    # 650 steps: with "none of these" to tell from signet-ring, 500 steps left the loss at 0.275 (at chance,
    # 0.69, for the first ~220), 650 at 0.12; learned / oracle % and recall@32 went from 70.0 / 78.3 / 0.84
    # (stage 2 of 300 steps) to 76.7 / 80.8 / 0.98 (250 steps). Twice as many steps of batch 8 left chance only
    # after ~700 steps; lr 2e-3 stayed at chance longer; 150 steps on bags without noise slots first left
    # the loss at 0.40 after 400 more.
    # `mosaic`: each bag's evidence and look-alike patches are drawn afresh from all training slides (evidence of
    # the slide's kind), the fill is the slide's own: with a slide's own few evidence and look-alike patches in all
    # 8 of its bags, the reader tied answers to those very patches (shown its look-alikes and random patches, it
    # answered 97% of the evidence-free training slides, 77% of the test ones); 1,000 alignment steps without the
    # mosaic fitted better (loss 0.04) and generalised worse (oracle 86.7 -> 80.8%). With it, the aligned reader
    # answered 90.8% shown every evidence patch (against 86.7%), 78.3% shown all tokens (73.3%). 16 bags per slide
    # instead of 8 did not pay (76.7% against 81.7% reading one generated token, reader moved from step 0; same seed;
    # with 3 new tokens that reader wrote "AAA" for most answers, unparseable).
    # `short_steps` / `short_tokens`: the alignment first reads short bags (8 tokens: a slide's evidence and look-alikes
    # drawn as above, little fill) without noise slots, then the 32-token bags as above (numbers below: 300 + 400 steps). On the 32-token bags among
    # 192 noise tokens the loss sat at chance (~0.7) for ~300 of 650 steps; on 8-token bags it fell below 0.4 within
    # 120 steps. From scratch on one machine the align stage took 298 s against 371 s for 650 steps (the short bags'
    # set adds 13 s to the dataset stage). Same seed and slides, with polish (below),
    # learned / oracle %, recall@32: 79.2 / 88.3 / 0.935, against 82.5 / 90.0 / 0.941 after 650 steps (stage 2 of 200
    # steps; one question is 0.8 points). The whole default from scratch on one machine: 76.7 / 87.5 / 0.926 in 864 s,
    # where the previous default (650 steps, stage 2 of 250, no polish) gave 76.7 / 91.7 / 0.941 in 930 s.
    # `patches_per_slide` / `patch_evidence_repeat`: single-patch questions join the first phase (region-level
    # supervision, the demo's ROI captions): each training slide's evidence patches, answered with its kind (asked
    # `patch_evidence_repeat` times), then look-alikes and plain tissue alternating, answered "none of these", one patch
    # per bag, up to `patches_per_slide` (8: 2,880 questions beside the 2,880 short bags; the first phase 450 steps,
    # ~80 s). A slide's answer says only that one of its ~350 patches is of a kind; these say which patch, and what the
    # look-alikes are not. Same slides and seed (learned / oracle %, recall@32): without them 76.7 / 87.5 / 0.926 (300 +
    # 400 steps); with them 84.2 / 90.0 / 0.963 (450 + 400, a prototype of this code), 83.3 / 89.2 / 0.967 (450 + 300,
    # the prototype) and 81.7 / 87.5 / 0.967 (450 + 300, this code: the default). Did not pay (450 or 600 + 300 or 400
    # steps): 16 per slide with evidence x4, 78.3 / 91.7 / 0.839; 12 with evidence x2 and every look-alike first,
    # 80.0 / 91.7 / 0.987; the same with the slide's most atypical plain patches (largest sum of log1p(z^2)) as the
    # negatives, 79.2 / 90.0 / 0.981; the single patches also in the second phase, 81.7 / 85.0 / 0.939; region bags
    # filled from the slide's 64 most atypical plain patches (all bags / half), 80.8 / 90.8 / 0.931 and 80.8 / 87.5 /
    # 0.939. In every variant the learned top 32 left 23-37% of the evidence-free slides named as a kind (mostly
    # signet-ring), where the oracle's random tokens left 0-7%: what the reader still misreads. Seed 1 (train.seed,
    # model.seed, model.llm_seed = 1) of this alignment with stage 2 as before: 59.2 / 79.2 / 0.620 (stage 2 lost
    # keratin pearls; loss 0.36), where the default without the single patches gave 74.2 / 85.8 / 0.944; seed 2: 52.5 /
    # 85.8 / 0.624 (keratin lost again). The readers were fine, stage 2 was not: with the exploration noise on the scores (train.model.score_noise,
    # below) the same readers gave 80.8 / 89.2 / 0.961 (seed 0), 75.0 / 95.0 / 0.820 (seed 1) and 80.8 / 89.2 / 0.961
    # (seed 2): `python -m sparsewsi.demo.seeds` (README, Seeds).
    c.align = ml_collections.ConfigDict(dict(steps=300, batch_size=16, lr=1e-3, regions_per_slide=8, tokens=32,
                                             noise_slots=192, lookalikes=True, mosaic=True,
                                             short_steps=450, short_tokens=8, patches_per_slide=8,
                                             patch_evidence_repeat=1))

    # The trainer config (see sparsewsi/training/trainer.py); data.* is set by the demo.
    t = ml_collections.ConfigDict()
    t.seed = 0
    # It was 250 steps, so that the alignment could have 650 within the 15-minute budget: the scorer's ranks
    # barely moved between steps 300 and 400 (four kinds: every kind's share in the top 32 within 0.03),
    # and from step 200 to 300 signet-ring's share fell (0.66 -> 0.57) while accuracy rose (66.7 -> 70.0%).
    # A longer stage 2 did not pay (reader held still for 100 steps, same aligned reader): 330 steps, 76.7% /
    # recall@32 0.954 against 75.8% / 0.976 at 250.
    # 200 since the polish stage (below): the reader polished from stage 2's step 200 answered 82.5% (recall@32 0.941,
    # oracle 90.0%), from step 250 81.7% (0.941, 88.3%): the scorer had settled by step 200.
    t.total_steps = 200
    t.batch_size = 16
    t.log_every = 1
    t.progress = True
    t.tensorboard = False
    t.model = ml_collections.ConfigDict(dict(
        feature_dim=0,  # set from the extracted features
        # All ~350 tokens of a bag enter the noise gate and the LLM (candidate cap off), as in the
        # method (a top-64 cap chosen by a young scorer held ~1% of the evidence: nothing to learn from).
        k=32, candidate_cap=0, scorer_kind="mlp", scorer_hidden=64, scorer_depth=2, scorer_heads=4,
        # The scorer also sees log1p(x^2) of the slide-normalised features (how atypical a patch is for
        # its slide, on either side): the evidence kinds lie at both ends of the main colour axis, and on
        # x alone the scorer settled on one end within ~20 steps and found two kinds of four (recall@32
        # 0.51, whichever two depended on the reader); with the squares, 0.83 (see the README).
        scorer_squares=True,
        # A low starting temperature: the aligned reader needs evidence tokens nearly clean, and with
        # tau 2.0 -> 0.1 over 250 steps the loss sat at chance for ~225 steps (0.5 -> 0.1 over 150: ~90).
        # score_noise: Gumbel exploration noise on the standardised scores, annealed by cosine from 1.0 to 0 over the
        # first 150 steps (score_noise_steps). Without it, seeds 1 and 2 of this config (train.seed, model.seed,
        # model.llm_seed) lost keratin pearls in stage 2: the scorer pushed them to the bottom of every bag within 100
        # steps (recall@32 0.00, where the Soft Top-K gives a token no gradient), from readers that read them at
        # 100%. Learned % / recall@32 / oracle % over seeds 0, 1, 2 (same slides and aligned readers): without the
        # noise 81.7 / 0.967 / 87.5, 59.2 / 0.620 / 79.2, 52.5 / 0.624 / 85.8; with it 80.8 / 0.961 / 89.2,
        # 75.0 / 0.820 / 95.0, 80.8 / 0.961 / 89.2. Constant noise 1.0 found keratin at seed 1 too but kept signet-ring
        # recall at 0.67 (0.63 annealed); tau_start 2.0 instead did not find keratin (recall 0.00). (An older reader,
        # without "none of these", lost most of its recall under constant noise 1.0: 47.5%, 0.50 against 75.8%, 0.976.)
        # With the 96-wide features (above), noise 1.0 left signet-ring recall@32 at 0.44 (learned 81.7%); 2.0 gave 0.66
        # (85.8%), and 2.0 with the scorer at twice the base rate (param_groups) 0.94 (89.2%, recall@32 0.972 overall);
        # 3.0 with it lost every kind but keratin (52.5%). A scorer at 0.5 of the rate (noise 1.0) found keratin only
        # (51.7%; at 192 wide, 0.25: 52.5%).
        score_noise=2.0, score_noise_steps=150,
        # gate_floor: for its first 50 steps the noise gate keeps every token at least partly clean (floor 0.5
        # falling to 0), so that a reader can answer from evidence the young scorer ranks low, and the scorer gets a
        # gradient towards it. Mosaic-aligned readers, reader held still for 100 steps (learned %, recall@32): seed 0
        # 47.5 / 0.36 without the floor (found keratin only), 78.3 / 0.89 with it over 100 steps, 80.0 / 0.93 over
        # 50; seed 1 (whole training) 65.0 / 0.91 over 100 steps, 64.2 / 0.89 over 50, where without it stage 2 sat
        # at chance (24.2 / 0.00, reader moved from step 0). It costs the luckiest case a little: the seed-0 reader
        # moved from step 0 reached 81.7 / 0.965 without the floor, 76.7 / 0.93 with it (100 steps).
        gate_floor=0.5, gate_floor_steps=50,
        tau_start=0.5, tau_end=0.1, tau_steps=150, denoiser=True, projector_hidden=128,
        llm_seed=0, seed=0,
        # The random-weight encoder's features share a large common part: standardise each feature
        # across the bag, or every visual token looks the same. Robustly (median / MAD): a 32-token
        # region bag with 1-3 evidence outliers then normalises like the slide it came from (with mean
        # / std the aligned reader was lost on whole slides: SparseLearn stayed at chance).
        feature_norm="bag_robust"))
    t.llm = ml_collections.ConfigDict(dict(path=None, tokenizer=None, dtype="float32", param_dtype="float32",
                                           tiny=dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                                     max_position_embeddings=1024)))
    # The tiny LLM is randomly initialised (nothing is downloaded): alignment trains it at full rate.
    # 128 wide: a 64-wide reader plateaued at ~75% shown every evidence patch (it confused two kinds;
    # 78% after 1,500 alignment steps; with 4 layers its alignment loss stayed at the same ~0.22); 128: 95%.
    t.lora = ml_collections.ConfigDict(dict(rank=0, alpha=16.0, targets=None))
    t.optim = ml_collections.ConfigDict(dict(
        lr=1e-3, warmup_steps=20, end_lr_ratio=0.05, weight_decay=0.0, clip_norm=1.0, accumulate_steps=1,
        # Stage 2 (SparseLearn) moves the aligned reader (LLM, projector) at a tenth of the scorer's rate,
        # as the recipe's stage 2 fine-tunes the LLM far more gently than the new modules: at full rate
        # it memorised the 360 training slides (training loss 0.08) and its reading of every evidence
        # patch fell from 95% to 71% on test slides; at 0.1 it stayed at 92-98%. (Alignment: all at 1.0.)
        # With "none of these" (one seed, same aligned reader): at 0.3, learned / oracle % and recall@32
        # 53.3 / 71.7 / 0.46, against 76.7 / 80.8 / 0.98 at 0.1.
        # The reader is held still for stage 2's first 100 steps (lr 0; its Adam moments gather) while the scorer
        # learns what it reads: a reader moved from step 0 can unlearn reading before the scorer has found anything
        # (confidently wrong on the first, partly noised whole slides, it falls back on the answer prior, loss 0.69,
        # and the scorer gets no gradient). One reader (aligned with a shorter-prompt tokenizer, not kept: see
        # token_buckets) did so for 125 steps; held still for 100 it led the scorer to recall@32 0.86 (learned 56.7%).
        # On the default reader: 75.8% / 0.976 against 78.3% / 0.959 moved from step 0. It does not rescue every
        # reader (tau, above).
        # The scorer (the new module, trained only here) at twice the base rate (see score_noise).
        param_groups=[(r"llm\..*", 0.1, 100), (r"projector\..*", 0.1, 100), (r"scorer\..*", 2.0), (r".*", 1.0)]))
    t.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))
    t.checkpoint = ml_collections.ConfigDict(dict(every=100, keep=2, async_save=False))
    t.data = ml_collections.ConfigDict(dict(
        source="tfds", path="", split="train", features_root="", max_patches=416, patch_buckets=(416,),
        # 144 text tokens: the demo's prompts are 129-137 tokens (the longest bucket is also the limit).
        # Shorter prompts did not pay: a 512-id tokenizer trained on the demo's questions spelt them in ~60
        # tokens and made alignment steps 1.5x faster, but the reader learned far slower (alignment loss 0.24
        # after 650 steps, against 0.11; 0.42 and 0.31 at step 650 of 900 in two other inits): the 2-layer
        # reader seems to use the text positions after the image as working space.
        token_buckets=(144,), worker_count=0, fixed_shapes=True))
    c.train = t

    # Polish (after SparseLearn): the reader (projector, LLM) is fine-tuned on the Hard Top-K of the frozen scorer,
    # the very k clean tokens inference shows it (SparseLearn and the alignment always show it ~350 tokens: k clean or
    # the region bag, the rest noise). 0 steps = off. On the previous default's stage-2 model (this machine: learned
    # 76.7%, oracle 91.7%, recall@32 0.941; ~60 s): 100 steps at lr 1e-4 80.8%, 3e-4 81.7%, 1e-3 78.3%; the gain is
    # on evidence-free slides, which the unpolished reader called "signet-ring" when shown their look-alikes
    # (13 of 30, 4 after polish). Gumbel noise on the scores choosing the k tokens (0.5, 1.0) did not pay (80.0, 79.2%).
    # This default's stage-2 readers, shown 32 tokens only, wrote three letters ("BDD") for most answers (unparsed:
    # 27.5% and 0.0% for seeds 0 and 1; first letter right on 70.8% and 75.0%); polished they write one: 76.7, 74.2%.
    c.polish = ml_collections.ConfigDict(dict(steps=100, batch_size=16, lr=3e-4, warmup_steps=10))

    c.eval = ml_collections.ConfigDict(dict(
        k=32, selectors=("learned", "random", "uniform", "spatial", "all", "oracle"),
        all_tokens_cap=512,  # 'all': every token of the bag (evenly sub-sampled above the cap)
        batch_size=16, max_new_tokens=3, seed=0))  # the reply is a letter
    c.report = ml_collections.ConfigDict(dict(heatmap_slides=3, thumbnail_px=360))

    if "small" in a:
        c.num_slides = 8
        c.workers = 1
        c.slides.update(tissue_patches=(100, 130), max_foci=1, distractors=(2, 3), tile=128, svs_every=2)
        c.dataset.option_orders = 1
        c.align.update(steps=2, batch_size=4, regions_per_slide=1, short_steps=2)
        c.train.update(total_steps=4, batch_size=4)
        c.polish.update(steps=2, batch_size=4, warmup_steps=1)
        c.train.model.update(candidate_cap=64, tau_steps=4, gate_floor_steps=2, score_noise_steps=4, scorer_hidden=16,
                             projector_hidden=16)
        c.train.optim.warmup_steps = 1
        c.train.checkpoint.every = 2
        c.train.data.update(max_patches=256, patch_buckets=(256,))
        c.eval.update(batch_size=8, max_new_tokens=3, all_tokens_cap=256)
        c.report.update(heatmap_slides=2, thumbnail_px=200)
    return c
