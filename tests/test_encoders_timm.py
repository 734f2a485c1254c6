"""Parity of the Flax encoders with the real timm VisionTransformer and open_clip AttentionalPooler.

(``tests/test_encoders.py`` also checks re-stated references; this file runs the libraries' own
code, imported through ``tests/torchvision_stub.py`` since PyPI torchvision does not import beside
the pinned CPU torch.) Random weights everywhere, float32, max abs difference <= 1e-4.
"""

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import torchvision_stub  # noqa: E402  (tests/ is on sys.path)

torchvision_stub.install()
timm = pytest.importorskip("timm", reason="timm is installed by launch/local.sh (pip --no-deps)")
open_clip_transformer = pytest.importorskip("open_clip.transformer")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from sparsewsi.features import encoders as E  # noqa: E402
from sparsewsi.features import weights as W  # noqa: E402

SMALL = dict(image_size=64, width=48, depth=2, heads=3)


def _randomise(module):
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in module.named_parameters():
            scale = 0.5 if ("gamma" in name or "norm" in name or "ln_" in name) else 0.2
            p.copy_(torch.randn(p.shape, generator=g) * scale)
    return module.eval()


def _timm_vit(cfg, global_pool="token"):
    return timm.create_model(
        "vit_large_patch16_224", pretrained=False, img_size=cfg.image_size, patch_size=cfg.patch_size,
        embed_dim=cfg.width, depth=cfg.depth, num_heads=cfg.heads, mlp_ratio=cfg.mlp_ratio,
        init_values=cfg.layer_scale, reg_tokens=cfg.num_reg_tokens, no_embed_class=cfg.no_embed_class,
        num_classes=0, global_pool=global_pool,
    )


class ConchVisual(torch.nn.Module):
    """CONCH's visual tower forward_no_head, built from timm's trunk and open_clip's pooler."""

    def __init__(self, cfg):
        super().__init__()
        self.trunk = _timm_vit(cfg, global_pool="")
        self.attn_pool_contrast = open_clip_transformer.AttentionalPooler(
            d_model=cfg.pool_dim, context_dim=cfg.width, n_head=cfg.pool_heads, n_queries=cfg.pool_queries)
        self.ln_contrast = torch.nn.LayerNorm(cfg.pool_dim)
        self.proj_contrast = torch.nn.Parameter(torch.randn(cfg.pool_dim, cfg.pool_dim))  # unused by the 512-d feature

    def forward(self, x):
        return self.ln_contrast(self.attn_pool_contrast(self.trunk(x))[:, 0])


def _max_diff(cfg, ref):
    sd = {k: v.detach().numpy() for k, v in ref.state_dict().items()}
    model = W.load_state_dict(E.create_encoder(cfg, seed=1), sd)
    x = np.random.default_rng(0).normal(size=(2, cfg.image_size, cfg.image_size, 3)).astype(np.float32)
    ours = np.asarray(jax.jit(lambda m, v: m(v))(model, jnp.asarray(x)))
    with torch.no_grad():
        theirs = ref(torch.from_numpy(x).permute(0, 3, 1, 2)).numpy()
    assert ours.shape == theirs.shape == (2, cfg.output_dim)
    return float(np.abs(ours - theirs).max())


@pytest.mark.parametrize("cfg", [
    E.get_config("tiny", **SMALL),  # UNI: vit_large_patch16_224 structure with LayerScale, CLS output
    E.get_config("tiny", **SMALL, layer_scale=None),
    E.get_config("tiny", **SMALL, num_reg_tokens=4, no_embed_class=True),
], ids=["uni-layerscale", "vit-plain", "registers"])
def test_vit_matches_timm(cfg):
    assert _max_diff(cfg, _randomise(_timm_vit(cfg))) <= 1e-4


@pytest.mark.parametrize("cfg", [
    E.get_config("tiny-conch", **SMALL),
    E.get_config("tiny-conch", **SMALL, pool_dim=48, pool_heads=4),
], ids=["conch", "conch-fused-pooler"])
def test_conch_matches_timm_trunk_and_open_clip_pooler(cfg):
    assert _max_diff(cfg, _randomise(ConchVisual(cfg))) <= 1e-4
