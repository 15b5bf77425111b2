"""KV caches. `DynamicKVCache` grows by concatenation: simple and exact, for the reference loop."""

from __future__ import annotations

import torch


class DynamicKVCache:
    """Per-layer keys and values (B, kv_heads, S, D), appended to on every forward."""

    def __init__(self, num_layers: int):
        self.keys: list[torch.Tensor | None] = [None] * num_layers
        self.values: list[torch.Tensor | None] = [None] * num_layers

    @property
    def length(self) -> int:
        return 0 if self.keys[0] is None else self.keys[0].shape[2]

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.keys[layer] is not None:
            k = torch.cat([self.keys[layer], k], dim=2)
            v = torch.cat([self.values[layer], v], dim=2)
        self.keys[layer], self.values[layer] = k, v
        return k, v


class StaticKVCache:
    """Preallocated keys and values, (rows, kv_heads, max_len, D) per layer, written in place.

    Rows 0..B-1 are the sequences of the current forward; `slots` (B, T), set by the caller before each
    forward, says where each new token's key and value go. Shapes never change, so a decode step over
    it can be captured in a CUDA graph.
    """

    def __init__(self, num_layers: int, rows: int, kv_heads: int, max_len: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device):
        shape = (rows, kv_heads, max_len, head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.rows, self.max_len = rows, max_len
        self.slots: torch.Tensor | None = None
        self.row_offset = 0
        """The forward's rows are cache rows row_offset.. (a prefill in groups of rows sets it; decode leaves 0)."""
        self.decoding = False
        """Set for a decode step (T == 1, row b's query at slot slots[b, 0], seeing slots <= it): attention then
        reads only those slots (gazelle.kernels.decode_attention) and needs no mask."""

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        B, T = self.slots.shape
        rows = torch.arange(B, device=k.device)[:, None].expand(B, T)
        first = self.row_offset
        keys, values = self.keys[layer][first : first + B], self.values[layer][first : first + B]
        keys[rows, :, self.slots] = k.transpose(1, 2)  # (B, T, kv_heads, D) into their slots
        values[rows, :, self.slots] = v.transpose(1, 2)
        return keys, values

    def reorder(self, index: torch.Tensor) -> None:
        """Row i becomes old row index[i] (for i < len(index)): compaction and n-fold expansion."""
        n = index.shape[0]
        for cache in (*self.keys, *self.values):
            cache[:n] = cache.index_select(0, index)
