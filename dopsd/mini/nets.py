"""Networks of the miniature: a small multimodal encoder (the VLM stand-in) and a single-stream DiT.

Encoder: reads [reference-image patches (optional) | caption tokens] with bidirectional attention and returns
only the caption-position features — a strict bottleneck, as a VLM summarises an image into the text
features the denoiser reads (the Z-Image + Qwen3-VL teacher path).

DiT: one sequence [caption features | reference patches (optional; the FLUX.2-klein editing path) | noisy
patches], adaLN-single modulation from the timestep and the pooled caption features, learned positions, a
small convolutional output head that refines pixels across patch borders, and a per-pixel gain on the noisy
input's fine luminance detail (x̂0 += gain ⊙ highpass(luma(x_σ)); `gate_input`) so that per-pixel detail (the
world's grain) can pass 12-px tokens while colour comes from the tokens alone. It predicts the
clean image (x-prediction; v-prediction gave speckled samples at this scale); the adapter turns that into a
velocity.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn

from dopsd.mini import world

GATE_INPUTS = ("rgb", "luma_highpass")


@dataclass
class MiniConfig:
    res: int = world.RES
    patch: int = 12  # 2×2 image tokens: few tokens make the global layout easy to learn on a CPU budget
    dim: int = 192
    layers: int = 6
    heads: int = 4
    mlp_ratio: float = 3.0
    head_channels: int = 16  # conv output head over the unpatchified features (0 = plain linear unpatchify)
    pixel_gate: bool = True  # x̂0 += gain(σ, content) ⊙ x_σ per pixel: carries per-pixel detail past coarse tokens
    # what the gate passes on: "rgb" (x_σ itself) or "luma_highpass" (only x_σ's fine luminance detail: colour then
    # comes from the tokens alone, so a LoRA that changes a colour need not turn the gate, and the grain, down)
    gate_input: str = "rgb"
    enc_dim: int = 96
    enc_patch: int = 6  # the encoder reads the reference image in finer patches than the DiT
    enc_layers: int = 2
    enc_heads: int = 4
    vocab_size: int = len(world.VOCAB)
    max_tokens: int = world.MAX_TOKENS
    sigma_min: float = 0.03  # v = (x − x̂0) / max(σ, sigma_min)
    base_steps: int = 32
    turbo_steps: int = 4
    shift: float = 1.0  # static schedule shift for both base and turbo

    @classmethod
    def from_dict(cls, d: dict) -> "MiniConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"mini config has unknown fields {unknown}; known: {sorted(known)}")
        return cls(**d)

    def __post_init__(self) -> None:
        if self.gate_input not in GATE_INPUTS:
            raise ValueError(f"mini config: gate_input must be one of {GATE_INPUTS}, got {self.gate_input!r}")

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def num_patches(self) -> int:
        return (self.res // self.patch) ** 2

    @property
    def patch_dim(self) -> int:
        return 3 * self.patch * self.patch


def tiny_config() -> MiniConfig:
    """A few-thousand-parameter configuration for fast tests."""
    return MiniConfig(dim=32, layers=2, heads=2, mlp_ratio=2.0, enc_dim=32, enc_layers=1, enc_heads=2, base_steps=8)


def luma_highpass(x: torch.Tensor) -> torch.Tensor:
    """(B, 1, H, W): the channel mean minus its 3×3 local mean (fine luminance detail; no colour, no flat areas)."""
    luma = x.mean(1, keepdim=True)
    return luma - F.avg_pool2d(F.pad(luma, (1, 1, 1, 1), mode="replicate"), 3, stride=1)


def patchify(img: torch.Tensor, p: int) -> torch.Tensor:
    b, c, h, w = img.shape
    return img.reshape(b, c, h // p, p, w // p, p).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // p) * (w // p), c * p * p)


def unpatchify(tokens: torch.Tensor, p: int, res: int, channels: int = 3) -> torch.Tensor:
    b, g = tokens.shape[0], res // p
    return tokens.reshape(b, g, g, channels, p, p).permute(0, 3, 1, 4, 2, 5).reshape(b, channels, res, res)


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor | None) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        mask = None if key_mask is None else key_mask[:, None, None, :]
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.out(y.transpose(1, 2).reshape(b, n, d))


class MLP(nn.Module):
    def __init__(self, dim: int, ratio: float):
        super().__init__()
        self.fc1 = nn.Linear(dim, int(dim * ratio))
        self.fc2 = nn.Linear(int(dim * ratio), dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class EncoderBlock(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn, self.mlp = Attention(dim, heads), MLP(dim, 2.0)

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor | None) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), key_mask)
        return x + self.mlp(self.norm2(x))


class MiniEncoder(nn.Module):
    """Caption tokens (+ optional reference image) → caption-position features (B, max_tokens, enc_dim)."""

    def __init__(self, cfg: MiniConfig):
        super().__init__()
        self.cfg = cfg
        self.tok = nn.Embedding(cfg.vocab_size, cfg.enc_dim)
        self.tok_pos = nn.Parameter(torch.randn(cfg.max_tokens, cfg.enc_dim) * 0.02)
        self.img = nn.Linear(3 * cfg.enc_patch**2, cfg.enc_dim)
        self.img_pos = nn.Parameter(torch.randn((cfg.res // cfg.enc_patch) ** 2, cfg.enc_dim) * 0.02)
        self.blocks = nn.ModuleList(EncoderBlock(cfg.enc_dim, cfg.enc_heads) for _ in range(cfg.enc_layers))
        self.norm = nn.LayerNorm(cfg.enc_dim)

    def forward(self, tokens: torch.Tensor, image: torch.Tensor | None = None) -> torch.Tensor:
        x = self.tok(tokens) + self.tok_pos
        mask = tokens != 0
        if image is not None:
            img = self.img(patchify(image, self.cfg.enc_patch)) + self.img_pos
            x = torch.cat([img, x], dim=1)
            mask = torch.cat([mask.new_ones(img.shape[:2]), mask], dim=1)
        for block in self.blocks:
            x = block(x, mask)
        return self.norm(x[:, -self.cfg.max_tokens :])


def timestep_embedding(sigma: torch.Tensor, dim: int) -> torch.Tensor:
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=sigma.device, dtype=torch.float32) / half)
    args = (sigma.float() * 1000.0)[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=1)


class DiTBlock(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_ratio: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False)
        self.attn, self.mlp = Attention(dim, heads), MLP(dim, mlp_ratio)
        self.mod = nn.Parameter(torch.zeros(6, dim))  # adaLN-single: per-block offsets to the shared modulation

    def forward(self, x: torch.Tensor, t: torch.Tensor, key_mask: torch.Tensor | None) -> torch.Tensor:
        sh1, sc1, g1, sh2, sc2, g2 = (t + self.mod[None]).unbind(1)
        h = self.norm1(x) * (1 + sc1[:, None]) + sh1[:, None]
        x = x + g1[:, None] * self.attn(h, key_mask)
        h = self.norm2(x) * (1 + sc2[:, None]) + sh2[:, None]
        return x + g2[:, None] * self.mlp(h)


class MiniDiT(nn.Module):
    """x̂0 = DiT(x_σ, σ, caption features, reference image). Inputs and outputs (B, 3, res, res)."""

    def __init__(self, cfg: MiniConfig):
        super().__init__()
        self.cfg = cfg
        d = cfg.dim
        self.cond_in = nn.Linear(cfg.enc_dim, d)
        self.patch_in = nn.Linear(cfg.patch_dim, d)
        self.pos = nn.Parameter(torch.randn(cfg.num_patches, d) * 0.02)
        self.type_emb = nn.Parameter(torch.randn(3, d) * 0.02)  # caption, reference, noisy
        self.t_mlp = nn.Sequential(nn.Linear(d, d), nn.SiLU(), nn.Linear(d, d))
        self.pool_in = nn.Linear(cfg.enc_dim, d)  # pooled caption features join the timestep modulation
        self.t_mod = nn.Sequential(nn.SiLU(), nn.Linear(d, 6 * d))
        self.blocks = nn.ModuleList(DiTBlock(d, cfg.heads, cfg.mlp_ratio) for _ in range(cfg.layers))
        self.norm_out = nn.LayerNorm(d, elementwise_affine=False)
        self.out_mod = nn.Linear(d, 2 * d)
        hc = cfg.head_channels
        self.out = nn.Linear(d, cfg.patch * cfg.patch * (3 + hc + 3 * cfg.pixel_gate))
        zero = [self.t_mod[1], self.out_mod, self.out]  # blocks start as identity, output as zero
        if hc:
            # pixel-level refinement across patch borders (sees the noisy input too): removes blocky patches
            self.head = nn.Sequential(nn.Conv2d(hc + 3, 32, 3, padding=1), nn.GELU(), nn.Conv2d(32, 3, 3, padding=1))
            zero.append(self.head[2])
        for layer in zero:
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(
        self,
        x: torch.Tensor,
        sigma: torch.Tensor,
        feats: torch.Tensor,
        feats_mask: torch.Tensor | None = None,
        ref: torch.Tensor | None = None,
        ref_on: torch.Tensor | None = None,
    ) -> torch.Tensor:
        cfg = self.cfg
        b = x.shape[0]
        fmask = feats_mask if feats_mask is not None else feats.new_ones(feats.shape[:2], dtype=torch.bool)
        w = fmask.to(feats.dtype)[..., None]
        pooled = (feats * w).sum(1) / w.sum(1).clamp_min(1.0)
        temb = self.t_mlp(timestep_embedding(sigma, cfg.dim).to(x.dtype)) + self.pool_in(pooled)
        t = self.t_mod(temb).reshape(b, 6, cfg.dim)
        parts = [self.cond_in(feats) + self.type_emb[0]]
        masks = [fmask]
        if ref is not None:
            parts.append(self.patch_in(patchify(ref, cfg.patch)) + self.pos + self.type_emb[1])
            on = ref_on if ref_on is not None else x.new_ones(b, dtype=torch.bool)
            masks.append(on.bool()[:, None].expand(b, cfg.num_patches))
        parts.append(self.patch_in(patchify(x, cfg.patch)) + self.pos + self.type_emb[2])
        masks.append(x.new_ones(b, cfg.num_patches, dtype=torch.bool))
        h = torch.cat(parts, dim=1)
        key_mask = torch.cat(masks, dim=1)
        for block in self.blocks:
            h = block(h, t, key_mask)
        shift, scale = self.out_mod(F.silu(temb)).chunk(2, dim=1)
        h = self.norm_out(h[:, -cfg.num_patches :]) * (1 + scale[:, None]) + shift[:, None]
        hc = cfg.head_channels
        out = unpatchify(self.out(h), cfg.patch, cfg.res, 3 + hc + 3 * cfg.pixel_gate)
        x0 = out[:, :3]
        if cfg.pixel_gate:
            # a 12-px token cannot describe per-pixel grain; the posterior mean of such detail is a σ-dependent
            # shrinkage of x_σ, which this gain expresses exactly (real DiTs have per-pixel tokens instead)
            gain = out[:, 3 + hc :]
            if cfg.gate_input == "rgb":
                x0 = x0 + gain * x
            else:  # one gain for the luminance detail (the mean of the three gain channels: same weights' shape)
                x0 = x0 + gain.mean(1, keepdim=True) * luma_highpass(x)
        if hc:
            x0 = x0 + self.head(torch.cat([out[:, 3 : 3 + hc], x], dim=1))
        return x0


LORA_TARGETS = ["attn.qkv", "attn.out", "mlp.fc1", "mlp.fc2"]


def build(cfg: MiniConfig, state: dict[str, torch.Tensor] | None = None) -> tuple[MiniDiT, MiniEncoder]:
    """The DiT and encoder of `cfg`, loaded from a recipe state dict ("dit.*", "encoder.*") when given."""
    dit, enc = MiniDiT(cfg), MiniEncoder(cfg)
    if state is not None:
        dit.load_state_dict({k[4:]: v for k, v in state.items() if k.startswith("dit.")})
        enc.load_state_dict({k[8:]: v for k, v in state.items() if k.startswith("encoder.")})
    return dit, enc
