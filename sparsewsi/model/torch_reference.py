"""A PyTorch reference for the SparseWSI selector: scorer + Hard Top-K + projector, without JAX.

This file imports only torch, safetensors and the standard library, so ``sparsewsi export`` copies it
next to the exported weights as ``sparsewsi_torch.py``; a PyTorch user then runs::

    from sparsewsi_torch import SparseWSISelector
    sel = SparseWSISelector.from_folder("export/")              # selector.safetensors + selector.json
    embeds, indices, valid = sel.visual_tokens(features, mask)  # [B, k, H] for the HF LLM in export/llm
    # splice `embeds` at the <image> token of the prompt's inputs_embeds and call
    # AutoModelForCausalLM.from_pretrained("export/llm").generate(inputs_embeds=..., attention_mask=...)

It reproduces the Flax scores and projector outputs (float32 parity tested to 1e-5). Module paths
mirror the Flax parameter names (``scorer.backbone.fc1.weight`` <- ``scorer.backbone.fc1.kernel``).
"""

from __future__ import annotations

import json
import math
import pathlib

import torch
from torch import nn
from torch.nn import functional as F

LN_EPS = 1e-6  # flax LayerNorm's default (torch's is 1e-5)


def squares(x):
    return torch.log1p(x * x)


class MLPScorer(nn.Module):
    def __init__(self, in_features: int, hidden: int, squares: bool = False):
        super().__init__()
        self.squares = squares
        self.norm = nn.LayerNorm(in_features, eps=LN_EPS)
        self.fc1 = nn.Linear(in_features * (2 if squares else 1), hidden)
        self.fc2 = nn.Linear(hidden, 1)

    def forward(self, x, mask):
        h = self.norm(x)
        if self.squares:
            h = torch.cat([h, squares(x)], dim=-1)
        return self.fc2(F.gelu(self.fc1(h)))[..., 0]


class EncoderBlock(nn.Module):
    def __init__(self, width: int, num_heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.num_heads = num_heads
        self.ln1 = nn.LayerNorm(width, eps=LN_EPS)
        self.qkv = nn.Linear(width, 3 * width)
        self.out = nn.Linear(width, width)
        self.ln2 = nn.LayerNorm(width, eps=LN_EPS)
        self.fc1 = nn.Linear(width, int(width * mlp_ratio))
        self.fc2 = nn.Linear(int(width * mlp_ratio), width)

    def forward(self, x, mask):
        b, n, w = x.shape
        q, k, v = self.qkv(self.ln1(x)).chunk(3, dim=-1)
        shape = (b, n, self.num_heads, w // self.num_heads)
        q, k, v = (t.reshape(shape).transpose(1, 2) for t in (q, k, v))
        attn_mask = mask[:, None, None, :]
        h = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        x = x + self.out(h.transpose(1, 2).reshape(b, n, w))
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


class TransformerScorer(nn.Module):
    def __init__(self, in_features: int, width: int, depth: int, num_heads: int, squares: bool = False):
        super().__init__()
        self.squares = squares
        self.proj = nn.Linear(in_features * (2 if squares else 1), width)
        self.blocks = nn.ModuleList([EncoderBlock(width, num_heads) for _ in range(depth)])
        self.norm = nn.LayerNorm(width, eps=LN_EPS)
        self.head = nn.Linear(width, 1)

    def forward(self, x, mask):
        h = self.proj(torch.cat([x, squares(x)], dim=-1) if self.squares else x)
        for block in self.blocks:
            h = block(h, mask)
        return self.head(self.norm(h))[..., 0]


class Scorer(nn.Module):
    def __init__(self, in_features: int, kind: str, hidden: int, depth: int, num_heads: int, standardize: bool = True,
                 squares: bool = False):
        super().__init__()
        if kind == "mlp":
            self.backbone = MLPScorer(in_features, hidden, squares)
        elif kind == "transformer":
            self.backbone = TransformerScorer(in_features, hidden, depth, num_heads, squares)
        else:
            raise ValueError(f"unknown scorer kind {kind!r}")
        self.standardize = standardize

    def forward(self, x, mask):
        """x [B, N, D] float32, mask [B, N] bool -> scores [B, N] (padding = 0)."""
        s = torch.where(mask, self.backbone(x, mask), torch.zeros((), dtype=x.dtype))
        if not self.standardize:
            return s
        m = mask.to(s.dtype)
        n = m.sum(-1, keepdim=True).clamp_min(1.0)
        mean = (s * m).sum(-1, keepdim=True) / n
        var = ((s - mean) ** 2 * m).sum(-1, keepdim=True) / n
        return torch.where(mask, (s - mean) * torch.rsqrt(var + 1e-6), torch.zeros((), dtype=s.dtype))


class Projector(nn.Module):
    def __init__(self, in_features: int, hidden: int, out_features: int):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden)
        self.fc2 = nn.Linear(hidden, out_features)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


def standardize_tokens(x, eps: float = 1e-6):
    mean = x.mean(-1, keepdim=True)
    var = x.var(-1, unbiased=False, keepdim=True)
    return (x - mean) * torch.rsqrt(var + eps)


def standardize_bag(x, mask, eps: float = 1e-6):
    """Per-feature standardisation over each bag's valid tokens (``feature_norm == "bag"``)."""
    m = mask.to(x.dtype)[..., None]
    n = m.sum(-2, keepdim=True).clamp_min(1.0)
    mean = (x * m).sum(-2, keepdim=True) / n
    var = ((x - mean) ** 2 * m).sum(-2, keepdim=True) / n
    return (x - mean) * torch.rsqrt(var + eps) * m


def _masked_median(x, mask):
    """Median over dim -2 of the valid rows (mean of the two middle values): [B, N, D] -> [B, 1, D]."""
    big = torch.finfo(x.dtype).max
    xs = torch.sort(torch.where(mask[..., None], x, torch.full((), big, dtype=x.dtype)), dim=-2).values
    n = mask.sum(-1).to(torch.int64)[:, None, None]
    lo = (n - 1).clamp_min(0).div(2, rounding_mode="floor").expand(-1, 1, x.shape[-1])
    hi = n.div(2, rounding_mode="floor").expand(-1, 1, x.shape[-1])
    med = 0.5 * (torch.gather(xs, -2, lo) + torch.gather(xs, -2, hi))
    return torch.where(n > 0, med, torch.zeros((), dtype=x.dtype))


def standardize_bag_robust(x, mask, eps: float = 1e-6):
    """Per-feature (x - median) / (1.4826 * MAD) over each bag's valid tokens (``feature_norm == "bag_robust"``)."""
    med = _masked_median(x, mask)
    mad = _masked_median((x - med).abs(), mask)
    return torch.where(mask[..., None], (x - med) / (1.4826 * mad + eps), torch.zeros((), dtype=x.dtype))


def hard_topk(scores, k: int, mask):
    """indices [B, k] of the k best valid tokens in slide order (valid picks first), valid [B, k]."""
    n = scores.shape[-1]
    masked = torch.where(mask, scores, torch.full((), -math.inf, dtype=scores.dtype))
    idx = torch.topk(masked, k, dim=-1).indices
    valid = torch.gather(mask, -1, idx)
    key = torch.sort(torch.where(valid, idx, idx + n), dim=-1).values
    valid = key < n
    return torch.where(valid, key, key - n), valid


class SparseWSISelector(nn.Module):
    """Scorer + Hard Top-K + projector: features -> k visual-token embeddings for the LLM."""

    def __init__(self, config: dict):
        super().__init__()
        self.config = dict(config)
        c = self.config
        self.scorer = Scorer(c["feature_dim"], c["scorer_kind"], c["scorer_hidden"], c["scorer_depth"],
                             c["scorer_heads"], squares=bool(c.get("scorer_squares", False)))
        self.projector = Projector(c["feature_dim"], c["projector_hidden"], c["llm_hidden_size"])

    @classmethod
    def from_folder(cls, folder) -> "SparseWSISelector":
        from safetensors.torch import load_file

        folder = pathlib.Path(folder)
        config = json.loads((folder / "selector.json").read_text())
        module = cls(config)
        tensors = load_file(str(folder / "selector.safetensors"))
        missing, unexpected = module.load_state_dict(tensors, strict=False)
        if missing or unexpected:
            raise ValueError(f"{folder / 'selector.safetensors'}: missing {missing}, unexpected {unexpected}")
        return module.eval()

    @torch.no_grad()
    def visual_tokens(self, features, mask=None, k: int | None = None):
        """features [B, N, D], mask [B, N] -> (embeds [B, k, H], indices [B, k], valid [B, k])."""
        features = torch.as_tensor(features, dtype=torch.float32)
        if mask is None:
            mask = torch.ones(features.shape[:2], dtype=torch.bool)
        mask = torch.as_tensor(mask, dtype=torch.bool)
        k = k or self.config["k"]
        norm = self.config.get("feature_norm", "token")
        if norm == "bag":
            features = standardize_bag(features, mask)
        elif norm == "bag_robust":
            features = standardize_bag_robust(features, mask)
        elif norm != "token":
            raise ValueError(f"selector.json: unknown feature_norm {norm!r}")
        idx, valid = hard_topk(self.scorer(features, mask), k, mask)
        picked = torch.gather(features, 1, idx[..., None].expand(-1, -1, features.shape[-1]))
        return self.projector(standardize_tokens(picked)), idx, valid
