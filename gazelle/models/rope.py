"""Rotary position embedding: inverse frequencies for each scaling scheme and the cos/sin tables.

The rotation itself (the half-split pairing of Hugging Face checkpoints, so q/k weights load without
permutation) is gazelle.kernels.rope.
"""

from __future__ import annotations

import math

import torch

from gazelle.models.config import RopeConfig


def inverse_frequencies(rope: RopeConfig, long: bool = False) -> torch.Tensor:
    """(rotary_dim // 2,) float32 inverse frequencies; `long` picks longrope's long-context factors."""
    dim = rope.rotary_dim
    exponents = torch.arange(0, dim, 2, dtype=torch.int64).float() / dim  # (dim/2,)
    inv_freq = 1.0 / (rope.theta**exponents)
    if rope.rope_type == "linear":
        return inv_freq / rope.factor
    if rope.rope_type == "llama3":
        return _llama3(inv_freq, rope)
    if rope.rope_type == "longrope":
        ext = torch.tensor(rope.long_factor if long else rope.short_factor, dtype=torch.float32)
        return 1.0 / (ext * rope.theta**exponents)
    if rope.rope_type == "yarn":
        return _yarn(inv_freq, rope)
    return inv_freq


def _llama3(inv_freq: torch.Tensor, rope: RopeConfig) -> torch.Tensor:
    """Llama 3.1: long wavelengths divided by `factor`, short ones kept, a linear blend in between."""
    old_len = rope.original_max_position_embeddings
    low_wavelen = old_len / rope.low_freq_factor
    high_wavelen = old_len / rope.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / rope.factor, inv_freq)
    smooth = (old_len / wavelen - rope.low_freq_factor) / (rope.high_freq_factor - rope.low_freq_factor)
    blended = (1 - smooth) * scaled / rope.factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(medium, blended, scaled)


def _yarn(inv_freq: torch.Tensor, rope: RopeConfig) -> torch.Tensor:
    """YaRN: interpolate low frequencies by `factor`, keep high ones, ramp between two rotation counts."""
    dim, base, orig = rope.rotary_dim, rope.theta, rope.original_max_position_embeddings

    def dim_of(rotations: float) -> float:  # the dimension that turns `rotations` times over the original length
        return dim * math.log(orig / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = dim_of(rope.beta_fast), dim_of(rope.beta_slow)
    if rope.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    keep = 1 - ramp  # 1 where the frequency is extrapolated unchanged
    return inv_freq / rope.factor * (1 - keep) + inv_freq * keep


class RotaryTables:
    """cos/sin for given positions under one RopeConfig; frequency vectors cached per device."""

    def __init__(self, rope: RopeConfig):
        self.rope = rope
        self._cache: dict[tuple[torch.device, bool], torch.Tensor] = {}

    def _inv_freq(self, device: torch.device, long: bool) -> torch.Tensor:
        key = (device, long)
        if key not in self._cache:
            self._cache[key] = inverse_frequencies(self.rope, long).to(device)
        return self._cache[key]

    def __call__(self, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """position_ids (B, T) -> cos, sin (B, T, rotary_dim) in `dtype`."""
        inv_freq = self._inv_freq(position_ids.device, False)
        if self.rope.rope_type == "longrope":
            # The long factors apply to the whole call once any position passes the original length.
            beyond = position_ids.max() + 1 > self.rope.original_max_position_embeddings
            inv_freq = torch.where(beyond, self._inv_freq(position_ids.device, True), inv_freq)
        freqs = position_ids[..., None].float() * inv_freq  # (B, T, dim/2)
        angles = torch.cat([freqs, freqs], dim=-1)  # (B, T, dim)
        scale = self.rope.attention_factor
        return (angles.cos() * scale).to(dtype), (angles.sin() * scale).to(dtype)
