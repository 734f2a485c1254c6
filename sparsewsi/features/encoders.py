"""Flax NNX patch encoders: a timm-structured ViT, with CLS output or a CoCa attentional pooler.

Covered structures (random weights here; real weights are imported from PyTorch state dicts by
:mod:`sparsewsi.features.weights`):

* ``"uni"``: timm ``vit_large_patch16_224`` with LayerScale (init 1e-5), 224 px, 1024-d CLS token
  after the final LayerNorm (UNI v1).
* ``"conch"``: CONCH v1 vision tower: a ViT-B/16 trunk at 448 px (no LayerScale), every output
  token (CLS included) attended by a 1-query attentional pooler (width 512, 8 heads, key/value
  width 768), then ``ln_contrast``. The 512-d feature is taken before ``proj_contrast`` (what
  SlideChat uses); ``project=True`` applies the contrastive projection as well.
* ``"tiny"`` / ``"tiny-conch"``: the same structures at width 48, depth 2, for tests and demos;
  ``"tiny-112"``: the tiny ViT at 112 px without LayerScale (the demo's encoder);
  ``"tiny-112-w96"`` / ``"tiny-112-w192"``: the same at width 96 / 192 (random weights: more random
  features separate more; see ``configs/demo.py``).

Faithfulness notes (why the code looks the way it does): timm LayerNorm eps is 1e-6 in the ViT and
1e-5 in open_clip's pooler norms; GELU is exact (Flax's default ``nnx.gelu`` is the tanh
approximation); attention is computed in float32 with the 1/sqrt(head_dim) scale on q.

Parity is tested (tests/test_encoders.py) against PyTorch re-statements of timm's ViT and
open_clip's AttentionalPooler, because timm and open_clip import torchvision at module load and
PyPI torchvision does not import beside the pinned CPU torch, even when they are installed with
``--no-deps``.

Shapes: images enter as ``[B, H, W, 3]`` uint8 (NHWC); :func:`preprocess` turns them into the
normalised ``[B, S, S, 3]`` float32 the model takes (S = ``config.image_size``).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclasses.dataclass(frozen=True)
class EncoderConfig:
    """A ViT patch encoder and its preprocessing.

    ``pool``: "token" (CLS after the final norm) or "attn" (CoCa attentional pooler over all tokens).
    ``layer_scale``: LayerScale init value, or None for no LayerScale.
    ``num_reg_tokens`` / ``no_embed_class``: timm register tokens and whether position embeddings
    skip the prefix tokens (as in timm).
    """

    name: str
    image_size: int = 224
    patch_size: int = 16
    width: int = 768
    depth: int = 12
    heads: int = 12
    mlp_ratio: float = 4.0
    layer_scale: float | None = None
    num_reg_tokens: int = 0
    no_embed_class: bool = False
    ln_eps: float = 1e-6
    pool: str = "token"
    pool_dim: int = 512
    pool_heads: int = 8
    pool_queries: int = 1
    pool_ln_eps: float = 1e-5
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    resize: str = "bicubic"  # how input patches are brought to image_size

    @property
    def output_dim(self) -> int:
        return self.pool_dim if self.pool == "attn" else self.width

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2


PRESETS: dict[str, EncoderConfig] = {
    "uni": EncoderConfig("uni", image_size=224, width=1024, depth=24, heads=16, layer_scale=1e-5),
    "conch": EncoderConfig("conch", image_size=448, width=768, depth=12, heads=12, pool="attn",
                           pool_dim=512, pool_heads=8, mean=OPENAI_CLIP_MEAN, std=OPENAI_CLIP_STD),
    "tiny": EncoderConfig("tiny", image_size=224, width=48, depth=2, heads=3, layer_scale=1e-5),
    # The demo's encoder: the tiny structure at 112 px input (no 2x upsampling of 112 px patches:
    # 49 tokens instead of 196, ~5x faster) and without LayerScale, whose 1e-5 init leaves a
    # random-weight CLS output nearly constant across patches.
    "tiny-112": EncoderConfig("tiny-112", image_size=112, width=48, depth=2, heads=3),
    "tiny-112-w96": EncoderConfig("tiny-112-w96", image_size=112, width=96, depth=2, heads=6),
    "tiny-112-w192": EncoderConfig("tiny-112-w192", image_size=112, width=192, depth=2, heads=6),
    "tiny-conch": EncoderConfig("tiny-conch", image_size=224, width=48, depth=2, heads=3, pool="attn",
                                pool_dim=32, pool_heads=4, mean=OPENAI_CLIP_MEAN, std=OPENAI_CLIP_STD),
}


def get_config(name: str, **overrides) -> EncoderConfig:
    """A preset by name (see :data:`PRESETS`), with optional field overrides."""
    if name not in PRESETS:
        raise ValueError(f"unknown encoder {name!r}; choose from {', '.join(PRESETS)}")
    return dataclasses.replace(PRESETS[name], **overrides)


def gelu_exact(x: jax.Array) -> jax.Array:
    return jax.nn.gelu(x, approximate=False)


class LayerScale(nnx.Module):
    """Per-channel scale ``gamma * x`` (timm ``ls1`` / ``ls2``)."""

    def __init__(self, dim: int, init: float):
        self.gamma = nnx.Param(jnp.full((dim,), init, jnp.float32))

    def __call__(self, x):
        return x * self.gamma[...]


class Attention(nnx.Module):
    """timm ViT self-attention: fused qkv projection, softmax(q k^T / sqrt(d)) v, output projection."""

    def __init__(self, dim: int, heads: int, *, rngs: nnx.Rngs):
        self.heads = heads
        self.qkv = nnx.Linear(dim, 3 * dim, rngs=rngs)
        self.proj = nnx.Linear(dim, dim, rngs=rngs)

    def __call__(self, x):  # [B, T, D]
        b, t, d = x.shape
        qkv = self.qkv(x).reshape(b, t, 3, self.heads, d // self.heads)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]  # [B, T, H, Dh]
        out = jax.nn.dot_product_attention(q, k, v)  # scale 1/sqrt(Dh), float32 inputs
        return self.proj(out.reshape(b, t, d))


class Mlp(nnx.Module):
    def __init__(self, dim: int, hidden: int, *, rngs: nnx.Rngs):
        self.fc1 = nnx.Linear(dim, hidden, rngs=rngs)
        self.fc2 = nnx.Linear(hidden, dim, rngs=rngs)

    def __call__(self, x):
        return self.fc2(gelu_exact(self.fc1(x)))


class Block(nnx.Module):
    """Pre-norm transformer block (timm naming: norm1, attn, ls1, norm2, mlp, ls2)."""

    def __init__(self, cfg: EncoderConfig, *, rngs: nnx.Rngs):
        d = cfg.width
        self.norm1 = nnx.LayerNorm(d, epsilon=cfg.ln_eps, rngs=rngs)
        self.attn = Attention(d, cfg.heads, rngs=rngs)
        self.norm2 = nnx.LayerNorm(d, epsilon=cfg.ln_eps, rngs=rngs)
        self.mlp = Mlp(d, int(d * cfg.mlp_ratio), rngs=rngs)
        self.ls1 = LayerScale(d, cfg.layer_scale) if cfg.layer_scale is not None else None
        self.ls2 = LayerScale(d, cfg.layer_scale) if cfg.layer_scale is not None else None

    def __call__(self, x):
        h = self.attn(self.norm1(x))
        x = x + (self.ls1(h) if self.ls1 is not None else h)
        h = self.mlp(self.norm2(x))
        return x + (self.ls2(h) if self.ls2 is not None else h)


class AttentionalPooler(nnx.Module):
    """open_clip ``AttentionalPooler``: learned queries attend over LayerNormed context tokens.

    Projections mirror ``torch.nn.MultiheadAttention`` with ``kdim = vdim = context_dim``.
    """

    def __init__(self, dim: int, context_dim: int, heads: int, queries: int, eps: float, *, rngs: nnx.Rngs):
        self.heads = heads
        self.query = nnx.Param(jax.random.normal(rngs.params(), (queries, dim), jnp.float32))
        self.ln_q = nnx.LayerNorm(dim, epsilon=eps, rngs=rngs)
        self.ln_k = nnx.LayerNorm(context_dim, epsilon=eps, rngs=rngs)
        self.q_proj = nnx.Linear(dim, dim, rngs=rngs)
        self.k_proj = nnx.Linear(context_dim, dim, rngs=rngs)
        self.v_proj = nnx.Linear(context_dim, dim, rngs=rngs)
        self.out_proj = nnx.Linear(dim, dim, rngs=rngs)

    def __call__(self, x):  # [B, T, C] -> [B, Q, D]
        b, t, _ = x.shape
        x = self.ln_k(x)
        q = self.ln_q(self.query[...])
        nq, d = q.shape
        dh = d // self.heads
        q = jnp.broadcast_to(self.q_proj(q)[None], (b, nq, d)).reshape(b, nq, self.heads, dh)
        k = self.k_proj(x).reshape(b, t, self.heads, dh)
        v = self.v_proj(x).reshape(b, t, self.heads, dh)
        out = jax.nn.dot_product_attention(q, k, v)
        return self.out_proj(out.reshape(b, nq, d))


class PatchEncoder(nnx.Module):
    """ViT patch encoder (timm attribute names, so weight import is a table of renames).

    ``__call__(x)``: x ``[B, S, S, 3]`` float32 normalised -> features ``[B, output_dim]``.
    """

    def __init__(self, cfg: EncoderConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        d = cfg.width
        self.patch_embed = nnx.Conv(3, d, (cfg.patch_size, cfg.patch_size), strides=(cfg.patch_size,) * 2,
                                    padding="VALID", rngs=rngs)
        self.cls_token = nnx.Param(0.02 * jax.random.normal(rngs.params(), (1, 1, d), jnp.float32))
        self.reg_token = (nnx.Param(0.02 * jax.random.normal(rngs.params(), (1, cfg.num_reg_tokens, d), jnp.float32))
                          if cfg.num_reg_tokens else None)
        n_pos = cfg.num_patches + (0 if cfg.no_embed_class else 1 + cfg.num_reg_tokens)
        self.pos_embed = nnx.Param(0.02 * jax.random.normal(rngs.params(), (1, n_pos, d), jnp.float32))
        self.blocks = nnx.List([Block(cfg, rngs=rngs) for _ in range(cfg.depth)])
        self.norm = nnx.LayerNorm(d, epsilon=cfg.ln_eps, rngs=rngs)
        if cfg.pool == "attn":
            self.attn_pool = AttentionalPooler(cfg.pool_dim, d, cfg.pool_heads, cfg.pool_queries,
                                               cfg.pool_ln_eps, rngs=rngs)
            self.ln_contrast = nnx.LayerNorm(cfg.pool_dim, epsilon=cfg.pool_ln_eps, rngs=rngs)
            self.proj_contrast = nnx.Param(cfg.pool_dim ** -0.5 * jax.random.normal(
                rngs.params(), (cfg.pool_dim, cfg.pool_dim), jnp.float32))
        elif cfg.pool != "token":
            raise ValueError(f"unknown pool {cfg.pool!r}; use 'token' or 'attn'")

    def tokens(self, x):
        """Final-normed tokens ``[B, prefix + N, D]`` (prefix = CLS + register tokens)."""
        b = x.shape[0]
        x = self.patch_embed(x)
        x = x.reshape(b, -1, x.shape[-1])
        prefix = [jnp.broadcast_to(self.cls_token[...], (b, 1, x.shape[-1]))]
        if self.reg_token is not None:
            prefix.append(jnp.broadcast_to(self.reg_token[...], (b,) + self.reg_token.shape[1:]))
        if self.cfg.no_embed_class:
            x = jnp.concatenate(prefix + [x + self.pos_embed[...]], axis=1)
        else:
            x = jnp.concatenate(prefix + [x], axis=1) + self.pos_embed[...]
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x)

    def __call__(self, x, project: bool = False):
        t = self.tokens(x)
        if self.cfg.pool == "token":
            return t[:, 0]
        pooled = self.ln_contrast(self.attn_pool(t)[:, 0])
        return pooled @ self.proj_contrast[...] if project else pooled


def preprocess(images: jax.Array, cfg: EncoderConfig) -> jax.Array:
    """uint8 ``[B, H, W, 3]`` -> normalised float32 ``[B, S, S, 3]`` (S = ``cfg.image_size``).

    Square inputs of another size are resized (bicubic, like the torchvision ``Resize`` of the
    reference transforms; antialiased when shrinking).
    """
    x = images.astype(jnp.float32) / 255.0
    b, h, w, c = x.shape
    s = cfg.image_size
    if (h, w) != (s, s):
        x = jax.image.resize(x, (b, s, s, c), method=cfg.resize, antialias=True)
    mean = jnp.asarray(cfg.mean, jnp.float32)
    std = jnp.asarray(cfg.std, jnp.float32)
    return (x - mean) / std


def create_encoder(cfg: EncoderConfig | str, seed: int = 0) -> PatchEncoder:
    """A randomly initialised encoder (fill it with :func:`sparsewsi.features.weights.load_weights`)."""
    if isinstance(cfg, str):
        cfg = get_config(cfg)
    return PatchEncoder(cfg, rngs=nnx.Rngs(seed))
