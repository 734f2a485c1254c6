"""Parity of the Flax ViT encoders with PyTorch references on random weights, and weight import errors.

``tests/test_encoders_timm.py`` checks the same encoders against timm's and open_clip's own code.
The references below re-state timm's ``VisionTransformer`` structure
(PatchEmbed conv, cls/reg tokens, pos_embed, pre-norm blocks with fused qkv, LayerScale, exact
GELU, LayerNorm eps 1e-6, CLS pooling) and open_clip's ``AttentionalPooler`` (which is built on
torch's own ``nn.MultiheadAttention``, used as is) with the same parameter names as the originals,
so the state dicts have exactly the checkpoints' layout.
"""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
nn = torch.nn
F = torch.nn.functional

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

from sparsewsi.features import encoders as E  # noqa: E402
from sparsewsi.features import weights as W  # noqa: E402


class TimmAttention(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.num_heads, self.head_dim = heads, dim // heads
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        x = F.scaled_dot_product_attention(q, k, v)
        return self.proj(x.transpose(1, 2).reshape(B, N, C))


class TimmLayerScale(nn.Module):
    def __init__(self, dim, init):
        super().__init__()
        self.gamma = nn.Parameter(init * torch.ones(dim))

    def forward(self, x):
        return x * self.gamma


class TimmMlp(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class TimmBlock(nn.Module):
    def __init__(self, dim, heads, mlp_ratio, init_values):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = TimmAttention(dim, heads)
        self.ls1 = TimmLayerScale(dim, init_values) if init_values else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = TimmMlp(dim, int(dim * mlp_ratio))
        self.ls2 = TimmLayerScale(dim, init_values) if init_values else nn.Identity()

    def forward(self, x):
        x = x + self.ls1(self.attn(self.norm1(x)))
        return x + self.ls2(self.mlp(self.norm2(x)))


class TimmPatchEmbed(nn.Module):
    def __init__(self, patch, dim):
        super().__init__()
        self.proj = nn.Conv2d(3, dim, patch, patch)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)


class TimmViT(nn.Module):
    """timm VisionTransformer(num_classes=0, global_pool='token' | '') forward path."""

    def __init__(self, cfg: E.EncoderConfig, global_pool="token"):
        super().__init__()
        d = cfg.width
        self.global_pool, self.no_embed_class, self.nreg = global_pool, cfg.no_embed_class, cfg.num_reg_tokens
        self.patch_embed = TimmPatchEmbed(cfg.patch_size, d)
        self.cls_token = nn.Parameter(torch.randn(1, 1, d) * 0.02)
        self.reg_token = nn.Parameter(torch.randn(1, cfg.num_reg_tokens, d) * 0.02) if cfg.num_reg_tokens else None
        n_pos = cfg.num_patches + (0 if cfg.no_embed_class else 1 + cfg.num_reg_tokens)
        self.pos_embed = nn.Parameter(torch.randn(1, n_pos, d) * 0.02)
        self.blocks = nn.Sequential(*[TimmBlock(d, cfg.heads, cfg.mlp_ratio, cfg.layer_scale) for _ in range(cfg.depth)])
        self.norm = nn.LayerNorm(d, eps=1e-6)

    def forward(self, x):
        x = self.patch_embed(x)
        prefix = [self.cls_token.expand(x.shape[0], -1, -1)]
        if self.reg_token is not None:
            prefix.append(self.reg_token.expand(x.shape[0], -1, -1))
        if self.no_embed_class:
            x = torch.cat(prefix + [x + self.pos_embed], 1)
        else:
            x = torch.cat(prefix + [x], 1) + self.pos_embed
        x = self.norm(self.blocks(x))
        return x[:, 0] if self.global_pool == "token" else x


class OpenClipAttentionalPooler(nn.Module):
    def __init__(self, d_model, context_dim, n_head, n_queries):
        super().__init__()
        self.query = nn.Parameter(torch.randn(n_queries, d_model))
        self.attn = nn.MultiheadAttention(d_model, n_head, kdim=context_dim, vdim=context_dim, batch_first=True)
        self.ln_q = nn.LayerNorm(d_model)
        self.ln_k = nn.LayerNorm(context_dim)

    def forward(self, x):
        x = self.ln_k(x)
        q = self.ln_q(self.query)
        return self.attn(q.unsqueeze(0).expand(x.shape[0], -1, -1), x, x, need_weights=False)[0]


class ConchVisual(nn.Module):
    """CONCH VisualModel.forward_no_head: trunk tokens -> attn_pool_contrast[:, 0] -> ln_contrast."""

    def __init__(self, cfg: E.EncoderConfig):
        super().__init__()
        self.trunk = TimmViT(cfg, global_pool="")
        self.attn_pool_contrast = OpenClipAttentionalPooler(cfg.pool_dim, cfg.width, cfg.pool_heads, cfg.pool_queries)
        self.ln_contrast = nn.LayerNorm(cfg.pool_dim)
        self.proj_contrast = nn.Parameter(cfg.pool_dim ** -0.5 * torch.randn(cfg.pool_dim, cfg.pool_dim))

    def forward(self, x, project=False):
        pooled = self.ln_contrast(self.attn_pool_contrast(self.trunk(x))[:, 0])
        return pooled @ self.proj_contrast if project else pooled


def _randomise(module):
    """Random weights everywhere (incl. LayerNorm affine, LayerScale, biases) so no mapping hides."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in module.named_parameters():
            scale = 0.5 if ("gamma" in name or "norm" in name or "ln_" in name) else 0.2
            p.copy_(torch.randn(p.shape, generator=g) * scale + (1.0 if name.endswith(("norm1.weight", "norm2.weight")) else 0.0))
    return module.eval()


def _reference(cfg):
    torch.manual_seed(0)
    return _randomise(ConchVisual(cfg) if cfg.pool == "attn" else TimmViT(cfg))


def _numpy_sd(module, prefix=""):
    return {prefix + k: v.detach().numpy() for k, v in module.state_dict().items()}


def _compare(cfg, sd, ref, batch=2, project=False):
    model = W.load_state_dict(E.create_encoder(cfg, seed=1), sd)
    x = np.random.default_rng(0).normal(size=(batch, cfg.image_size, cfg.image_size, 3)).astype(np.float32)
    ours = np.asarray(jax.jit(lambda m, v: m(v, project=project))(model, jnp.asarray(x)))
    with torch.no_grad():
        theirs = (ref(torch.from_numpy(x).permute(0, 3, 1, 2), project=project) if cfg.pool == "attn"
                  else ref(torch.from_numpy(x).permute(0, 3, 1, 2))).numpy()
    assert ours.shape == theirs.shape == (batch, cfg.output_dim)
    return float(np.abs(ours - theirs).max())


SMALL = dict(image_size=64, width=48, depth=2, heads=3)


@pytest.mark.parametrize("cfg", [
    E.get_config("tiny", **SMALL),  # UNI structure: LayerScale, CLS output
    E.get_config("tiny", **SMALL, layer_scale=None),
    E.get_config("tiny", **SMALL, num_reg_tokens=4, no_embed_class=True),  # UNI2-style registers
    E.get_config("tiny-conch", **SMALL),  # CONCH structure: kdim != d_model (separate q/k/v weights)
    E.get_config("tiny-conch", **SMALL, pool_dim=48, pool_heads=4),  # kdim == d_model (fused in_proj)
], ids=["uni-ls", "vit-plain", "registers", "conch", "conch-fused"])
def test_parity_with_pytorch_reference(cfg):
    ref = _reference(cfg)
    assert _compare(cfg, _numpy_sd(ref), ref) <= 1e-4


def test_conch_full_checkpoint_layout_and_projection():
    """A whole CONCH-style checkpoint (visual.trunk.*, text tower, caption pooler) loads; project=True matches."""
    cfg = E.get_config("tiny-conch", **SMALL)
    ref = _reference(cfg)
    sd = _numpy_sd(ref, "visual.")
    sd["text.token_embedding.weight"] = np.zeros((10, 4), np.float32)
    sd["logit_scale"] = np.zeros((), np.float32)
    sd["visual.attn_pool_caption.query"] = np.zeros((256, 48), np.float32)
    sd["visual.ln_caption.weight"] = np.zeros((48,), np.float32)
    assert _compare(cfg, sd, ref, project=True) <= 1e-4


def test_weight_files_roundtrip(tmp_path):
    import safetensors.numpy

    cfg = E.get_config("tiny", **SMALL)
    ref = _reference(cfg)
    sd = _numpy_sd(ref)
    torch.save(ref.state_dict(), tmp_path / "w.pth")
    safetensors.numpy.save_file(sd, str(tmp_path / "w.safetensors"))
    x = jnp.asarray(np.random.default_rng(1).normal(size=(1, 64, 64, 3)).astype(np.float32))
    outs = []
    for name in ("w.pth", "w.safetensors"):
        model, digest = W.load_weights(E.create_encoder(cfg, seed=3), tmp_path / name)
        assert len(digest) == 64
        outs.append(np.asarray(model(x)))
    np.testing.assert_array_equal(outs[0], outs[1])
    # export is the inverse of import
    again = W.export_state_dict(W.load_state_dict(E.create_encoder(cfg, seed=5), sd))
    assert set(again) == set(sd)
    for k in sd:
        np.testing.assert_array_equal(again[k], sd[k])


def test_import_errors_name_every_problem():
    cfg = E.get_config("tiny", **SMALL)
    sd = _numpy_sd(_reference(cfg))
    del sd["blocks.1.mlp.fc2.bias"]
    sd["blocks.0.attn.qkv.weight"] = sd["blocks.0.attn.qkv.weight"][:, :10]
    sd["blocks.7.norm1.weight"] = np.zeros(48, np.float32)
    model = E.create_encoder(cfg)
    before = np.asarray(model.cls_token[...]).copy()
    with pytest.raises(W.WeightImportError) as err:
        W.load_state_dict(model, sd, source="my.safetensors")
    msg = str(err.value)
    assert "my.safetensors" in msg
    assert "1 missing: blocks.1.mlp.fc2.bias" in msg
    assert "1 unexpected: blocks.7.norm1.weight" in msg
    assert "mis-shaped: blocks.0.attn.qkv.weight" in msg
    np.testing.assert_array_equal(np.asarray(model.cls_token[...]), before)  # untouched on error


def test_bad_weight_files(tmp_path):
    (tmp_path / "junk.pt").write_bytes(b"not a pickle")
    with pytest.raises(W.WeightImportError, match="junk.pt"):
        W.read_state_dict(tmp_path / "junk.pt")
    with pytest.raises(W.WeightImportError, match="no such weights file"):
        W.read_state_dict(tmp_path / "absent.safetensors")


@pytest.mark.parametrize("name,n_params", [("uni", 303_350_784), ("conch", None)])
def test_full_size_layouts(name, n_params):
    """The real UNI / CONCH checkpoint layouts (from the meta-device reference) fit, without allocating."""
    cfg = E.get_config(name)
    with torch.device("meta"):
        ref = ConchVisual(cfg) if cfg.pool == "attn" else TimmViT(cfg)
    prefix = "visual." if cfg.pool == "attn" else ""
    shapes = {prefix + k: np.broadcast_to(np.float32(0), tuple(v.shape)) for k, v in ref.state_dict().items()}
    model = nnx.eval_shape(lambda: E.create_encoder(cfg))
    assert W.check_state_dict(model, shapes) == []
    ours = sum(int(np.prod(v.shape)) for _, v in nnx.to_flat_state(nnx.state(model, nnx.Param)))
    assert ours == sum(int(np.prod(v.shape)) for v in shapes.values())
    if n_params is not None:
        assert ours == n_params  # timm vit_large_patch16_224 without head, with LayerScale
    assert cfg.output_dim == (512 if name == "conch" else 1024)


def test_preprocess_matches_reference_normalisation():
    cfg = E.get_config("tiny")
    img = np.random.default_rng(0).integers(0, 256, size=(2, 224, 224, 3), dtype=np.uint8)
    out = np.asarray(E.preprocess(jnp.asarray(img), cfg))
    want = (img / 255.0 - np.array(cfg.mean)) / np.array(cfg.std)
    np.testing.assert_allclose(out, want, atol=1e-5)
    big = np.asarray(E.preprocess(jnp.asarray(img), E.get_config("tiny", image_size=448)))
    assert big.shape == (2, 448, 448, 3)
    # The reference transforms resize PIL images (torchvision Resize on PIL = PIL BICUBIC, Keys a=-0.5,
    # the kernel jax.image 'cubic' uses); PIL rounds to uint8, so agreement is to ~1/255.
    from PIL import Image

    ref = np.stack([np.asarray(Image.fromarray(i).resize((448, 448), Image.BICUBIC)) for i in img]) / 255.0
    ref = (ref - np.array(cfg.mean)) / np.array(cfg.std)
    diff = np.abs(big - ref) * np.array(cfg.std)  # back to [0, 1] intensity units
    assert diff.mean() < 2 / 255 and np.quantile(diff, 0.99) < 8 / 255
