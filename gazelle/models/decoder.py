"""The one decoder: every supported family is this module configured by a DecoderConfig.

Parameter names are Hugging Face's (`model.layers.3.self_attn.q_proj.weight`), so checkpoints, PEFT
adapters and merged exports need no renaming. `Decoder.forward` returns final hidden states; callers
apply the lm_head through `Decoder.logits` (or chunk it inside a loss).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from gazelle.errors import GazelleError
from gazelle.kernels.decode_attention import decode_attention
from gazelle.kernels.glu import glu
from gazelle.kernels.linear_cross_entropy import HeadSlices
from gazelle.kernels.lora import fusable, lora_linear, lora_mlp, lora_qkv
from gazelle.kernels.multi_linear import MAX_M as MULTI_MAX_M
from gazelle.kernels.multi_linear import glu_linear, multi_linear
from gazelle.kernels.rms_norm import rms_norm
from gazelle.kernels.rope import apply_rotary_
from gazelle.models.config import DecoderConfig
from gazelle.models.hf_api import HFStyleMixin
from gazelle.models.offload import ActivationOffloader, offloaded_checkpoint
from gazelle.models.rope import RotaryTables
from gazelle.models.tiling import forced_tile, tiled
from gazelle.quant.linear4bit import groupable, grouped_forward


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, offset: float = 0.0):
        super().__init__()
        self.eps, self.offset = eps, offset
        self.weight = nn.Parameter(torch.zeros(dim) if offset else torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps, self.offset)


def softcap(x: torch.Tensor, cap: float | None) -> torch.Tensor:
    return x if cap is None else torch.tanh(x / cap) * cap


class Attention(nn.Module):
    def __init__(self, cfg: DecoderConfig, layer: int):
        super().__init__()
        self.layer, self.window = layer, cfg.window(layer)
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.scale, self.softcap = cfg.attn_scale, cfg.attn_softcap
        q_size, kv_size = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
        self.split = (q_size, kv_size, kv_size)
        self.fused, self.qk_norm = cfg.fused_qkv, cfg.qk_norm
        if cfg.fused_qkv:
            self.qkv_proj = nn.Linear(cfg.hidden_size, q_size + 2 * kv_size, bias=cfg.qkv_bias)
        else:
            self.q_proj = nn.Linear(cfg.hidden_size, q_size, bias=cfg.qkv_bias)
            self.k_proj = nn.Linear(cfg.hidden_size, kv_size, bias=cfg.qkv_bias)
            self.v_proj = nn.Linear(cfg.hidden_size, kv_size, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(q_size, cfg.hidden_size, bias=cfg.o_bias)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps, cfg.norm_offset)
            self.k_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps, cfg.norm_offset)

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if self.fused:
            return self.qkv_proj(x).split(self.split, dim=-1)
        adapted = fusable(x, self.q_proj, self.k_proj, self.v_proj)
        if adapted:
            return lora_qkv(x, *adapted)
        out = grouped(x, (self.q_proj, self.k_proj, self.v_proj))
        if out is not None:
            return out.split(self.split, dim=-1)
        return self.q_proj(x), self.k_proj(x), self.v_proj(x)

    def forward(self, x, cos, sin, mask, cache=None, residual=None):
        """residual (B, T, hidden): added to the output (the layer's residual stream), by the fused LoRA o
        projection's product where it runs."""
        B, T, _ = x.shape
        q, k, v = self.project(x)
        q = q.view(B, T, self.num_heads, self.head_dim)
        k = k.view(B, T, self.num_kv_heads, self.head_dim)
        v = v.view(B, T, self.num_kv_heads, self.head_dim)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rotary_(q, k, cos, sin)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, heads, T, D)
        if cache is not None:
            k, v = cache.update(self.layer, k, v)  # (B, kv_heads, S, D), S = past + T
        if getattr(cache, "decoding", False):  # the engine's decode step: one query per row at its cache slot
            out = decode_attention(q, k, v, cache.slots[:, 0], self.scale, self.softcap, self.window)
        else:
            out = attend(q, k, v, mask, self.scale, self.softcap)  # (B, heads, T, D)
        out = out.transpose(1, 2).reshape(B, T, -1)
        if residual is None:
            return self.o_proj(out)
        adapted = fusable(out, self.o_proj)
        if adapted:
            return lora_linear(out, *adapted, residual=residual)
        return residual + self.o_proj(out)


GROUPED_DECODE = True  # benchmarks/generate.py --no-grouped turns it off to measure the separate products


def grouped(x: torch.Tensor, linears: tuple[nn.Module, ...], act: str | None = None) -> torch.Tensor | None:
    """The linears over one decode-sized input (no gradient, CUDA) as one kernel launch, or None where none applies:
    [l_1(x) | .. | l_n(x)] for q/k/v, act(gate(x)) * up(x) for (gate, up) and an activation.

    Plain nn.Linear in x's dtype: gazelle.kernels.multi_linear; Linear4bit: the fused NF4 kernel over all of them
    (gazelle.quant.linear4bit.grouped_forward). Instead of three or two products (and an activation kernel)."""
    if not (GROUPED_DECODE and x.is_cuda and not torch.is_grad_enabled() and x.shape[:-1].numel() <= MULTI_MAX_M):
        return None
    dense = all(type(m) is nn.Linear and m.weight.dtype == x.dtype for m in linears)
    if not (dense or groupable(x, linears)):
        return None  # e.g. LoRA layers: their own fused products apply
    if act is not None and any(m.bias is not None for m in linears):
        return None
    if not dense:
        return grouped_forward(x, linears, act)
    if act is not None:
        return glu_linear(x, linears[0].weight, linears[1].weight, act)
    return multi_linear(x, [m.weight for m in linears], [m.bias for m in linears])


def attend(q, k, v, mask: torch.Tensor | None, scale: float, cap: float | None) -> torch.Tensor:
    """Grouped-query attention. mask: (B, 1, T, S) bool, True where a query may see a key; None = causal, T == S."""
    if cap is None and (mask is None or q.shape[2] > 1):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, scale=scale, enable_gqa=True)
    return grouped_attention(q, k, v, mask, scale, cap)


def grouped_attention(q, k, v, mask: torch.Tensor | None, scale: float, cap: float | None) -> torch.Tensor:
    """Attention with each key/value head read once for its whole group of query heads.

    Used for decoding (one query per sequence: SDPA's masked GQA path would copy K and V once per query
    head) and for soft-capped scores (gemma2), which SDPA cannot express.
    """
    B, H, T, D = q.shape
    kv_heads, S = k.shape[1], k.shape[2]
    groups = H // kv_heads
    q = q.reshape(B, kv_heads, groups * T, D)  # query heads of one group are consecutive
    scores = softcap(q @ k.transpose(-1, -2) * scale, cap)  # (B, kv_heads, groups * T, S)
    if mask is None:
        mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(S - T)[None, None]
    mask = mask[:, :, None].expand(-1, -1, groups, -1, -1).reshape(mask.shape[0], 1, groups * T, S)
    scores = scores.masked_fill(~mask, float("-inf"))
    out = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype) @ v  # (B, kv_heads, groups * T, D)
    return out.reshape(B, H, T, D)


MLP_TILE_BYTES = 256 * 2**20  # llama-8B shape, bf16: 3 x 14336 x 2 bytes a token, so tiles of 3,120 tokens past 12,480
# Light tiles cost speed on H100 (smaller GEMMs; an NF4 base dequantized once per tile): at 128 MB, qwen-1.5B
# 8 x 1024 lost 10% (QLoRA 15%) for 0.43 GiB, llama-8B 2 x 2048 7% (QLoRA 17%) for 0.2 GiB (NOTES section 12).
# At 512 MB neither of those tiles; 16k tokens of the llama-8B shape (1.3 GB) go in 3 tiles.
LIGHT_TILE_BYTES = 512 * 2**20


def draws_random(module: nn.Module) -> bool:
    """Whether a forward of module draws random numbers: an active dropout (an adapter's, in training)."""
    return any(isinstance(m, nn.Dropout) and m.p > 0 and m.training for m in module.modules())


class MLP(nn.Module):
    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        h, i, bias = cfg.hidden_size, cfg.intermediate_size, cfg.mlp_bias
        if cfg.fused_gate_up:
            self.gate_up_proj = nn.Linear(h, 2 * i, bias=bias)
        else:
            self.gate_proj = nn.Linear(h, i, bias=bias)
            self.up_proj = nn.Linear(h, i, bias=bias)
        self.down_proj = nn.Linear(i, h, bias=bias)
        self.fused = cfg.fused_gate_up
        self.act = cfg.hidden_act  # a name of gazelle.kernels.glu.ACTS
        self.intermediate_size = i
        self.tile_bytes: int | None = MLP_TILE_BYTES
        """A sequence whose intermediates exceed 4 tiles runs in tiles of about this many bytes of intermediates
        (gazelle.models.tiling); None never tiles."""
        self.light_tile_bytes: int | None = LIGHT_TILE_BYTES
        """Where tiles cost no extra work, intermediates of more than this many bytes are formed in even tiles
        (multiples of 128 tokens) of at most about this size: a forward without autograd (a checkpoint's forward,
        evaluation) and a checkpoint's recomputation (output=False, its values left out; backward forms each tile
        again, once, as it would untiled). A layer's forward and backward then hold one tile's gate, up and
        activation outputs (and their gradients), not the whole sequence's. Not with active dropout, whose draws
        would follow the tiles. None: never."""

    def forward(self, x: torch.Tensor, output: bool = True, residual: torch.Tensor | None = None) -> torch.Tensor:
        """output=False: only gradients will flow back through the result (a checkpoint's recomputation), so
        the fused LoRA path may leave its values unwritten and skip the down projection (lora_mlp).
        residual (..., hidden): added to the output; the untiled fused LoRA path adds it in the down projection."""
        y = self._tiles(x, output)
        if y is None:
            return self.block(x, output, residual)
        return y if residual is None else residual + y

    def _tiles(self, x: torch.Tensor, output: bool) -> torch.Tensor | None:
        """The output computed tile by tile when the sequence calls for tiles (see tile_bytes), else None."""
        # Grad mode must not decide: a checkpointed forward runs without autograd and its recomputation with it,
        # and both must draw LoRA dropout in the same (tile) order.
        tokens, forced = x.shape[:-1].numel(), forced_tile()
        if forced is not None and tokens > forced:
            return tiled(self.block, x, forced, rng=draws_random(self))
        block = self.block if output else functools.partial(self.block, output=False)
        per_token = 3 * self.intermediate_size * x.element_size()
        if self.tile_bytes:
            tile = max(1, self.tile_bytes // per_token)
            if tokens > 4 * tile:
                return tiled(block, x, tile, values=output, rng=draws_random(self))
        light = self.light_tile_bytes
        if (light and tokens * per_token > light and (not output or not torch.is_grad_enabled())
                and not draws_random(self)):
            tiles = -(-tokens * per_token // light)
            tile = -(-tokens // tiles)
            tile = -(-tile // 128) * 128 if tile > 128 else tile  # whole multiples of 128 rows for the GEMMs
            return tiled(block, x, tile, values=output, rng=False)
        return None

    def block(self, x: torch.Tensor, output: bool = True, residual: torch.Tensor | None = None) -> torch.Tensor:
        if self.fused:
            adapted = fusable(x, self.gate_up_proj, self.down_proj)
            if adapted:
                return lora_mlp(x, down=adapted[1], act=self.act, gate_up=adapted[0], output=output, residual=residual)
            gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
            y = self.down_proj(glu(gate, up, self.act))
        else:
            adapted = fusable(x, self.gate_proj, self.up_proj, self.down_proj)
            if adapted:
                return lora_mlp(x, *adapted, act=self.act, output=output, residual=residual)
            hidden = grouped(x, (self.gate_proj, self.up_proj), self.act)
            if hidden is None:
                hidden = glu(self.gate_proj(x), self.up_proj(x), self.act)
            y = self.down_proj(hidden)
        return y if residual is None else residual + y


class DecoderLayer(nn.Module):
    def __init__(self, cfg: DecoderConfig, layer: int):
        super().__init__()
        norm = lambda: RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, cfg.norm_offset)  # noqa: E731
        self.self_attn = Attention(cfg, layer)
        self.mlp = MLP(cfg)
        self.input_layernorm = norm()
        self.post_attention_layernorm = norm()
        self.sandwich = cfg.sandwich_norm
        if cfg.sandwich_norm:
            self.pre_feedforward_layernorm = norm()
            self.post_feedforward_layernorm = norm()

    def forward(self, x, cos, sin, mask, cache=None, output: bool = True):
        """output=False: a checkpoint's recomputation, which backpropagates through the result but never reads
        it; the MLP may then leave its last product out (MLP.forward). A gemma layer normalizes the MLP's output,
        whose backward reads it, so it computes everything."""
        if self.sandwich:  # gemma: norms on both sides of attention and of the MLP
            x = x + self.post_attention_layernorm(self.self_attn(self.input_layernorm(x), cos, sin, mask, cache))
            return x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))
        # The residual adds go into the fused LoRA products' epilogues where those run (no add kernels).
        x = self.self_attn(self.input_layernorm(x), cos, sin, mask, cache, residual=x)
        return self.mlp(self.post_attention_layernorm(x), output, residual=x)

    def recompute(self, x, cos, sin, mask, cache=None):
        """forward for a checkpoint's recomputation (output=False)."""
        return self.forward(x, cos, sin, mask, cache, output=False)


class DecoderBody(nn.Module):
    """Holds the parameters under the `model.` prefix of Hugging Face checkpoints."""

    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        table = torch.empty(cfg.vocab_size, cfg.hidden_size)
        if not table.is_meta:  # building on meta for loading skips the init (whose meta kernel pulls in dynamo)
            nn.init.normal_(table)
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size, _weight=table)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, cfg.norm_offset)


class Decoder(HFStyleMixin, nn.Module):
    """A decoder-only language model; `forward` gives hidden states, `logits` applies the head."""

    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        self.config = cfg
        self.model = DecoderBody(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.gradient_checkpointing = False
        self.checkpoint_offload = False
        """With gradient checkpointing, keep the saved layer inputs in CPU memory ("unsloth" mode)."""
        self.uncheckpointed_layers = 0
        """With gradient checkpointing, the top this many layers run without it: their activations stay on the GPU
        until their backward, which then recomputes nothing (memory for speed; the top ones are freed first)."""
        self._offloader = ActivationOffloader()
        self._host_embeddings = None  # a HostEmbeddings while the tables live in host memory (training)
        self._host_layers = None  # a HostLayers while some layers' frozen weights live in host memory (training)
        self.name_or_path: str | None = None
        """Where the weights came from: recorded in saved adapters as their base model."""
        self.lora_config = None
        """The LoraConfig of attached adapters, None without LoRA."""
        self.max_seq_length: int | None = None
        self.tokenizer = None
        """Set by FastLanguageModel.from_pretrained, for fast_generate."""
        self._engine = None
        self._rotary = {}
        for i in range(cfg.num_layers):
            rope = cfg.rope_for(i)
            self._rotary.setdefault(rope, RotaryTables(rope))
        self.tie_weights()

    def tie_weights(self) -> None:
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        cache=None,
        inputs_embeds: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Final hidden states (B, T, hidden) for input_ids (B, T).

        attention_mask: (B, past + T), 1 for tokens, 0 for padding (left or right).
        position_ids: (B, T); defaults to counting the unpadded tokens. Given without a cache, a reset to
            0 inside a row starts a new document: packed documents never attend to each other.
        cache: a KV cache with `length` and `update(layer, k, v)`; it grows by T.
        inputs_embeds: (B, T, hidden), the embedding rows of input_ids when looked up already (HostEmbeddings);
            the embedding scale still applies.
        """
        cfg = self.config
        B, T = input_ids.shape
        past = cache.length if cache is not None else 0
        documents = position_ids is not None and cache is None
        if position_ids is None:
            if attention_mask is None:
                position_ids = torch.arange(past, past + T, device=input_ids.device).expand(B, T)
            else:
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -T:]
        masks = {
            w: build_mask(T, past, attention_mask, position_ids if documents else None, w, input_ids.device)
            for w in {cfg.window(i) for i in range(cfg.num_layers)}
        }
        return self.run_layers(input_ids, position_ids, masks, cache, inputs_embeds)

    def run_layers(self, input_ids: torch.Tensor, position_ids: torch.Tensor, masks: dict, cache=None,
                   inputs_embeds: torch.Tensor | None = None) -> torch.Tensor:
        """Hidden states given positions (B, T) and, per sliding window (None = global), the attention mask
        (B, 1, T, S) bool or None for plain causal; the generation engine supplies its own masks here."""
        cfg = self.config
        host = self._host_embeddings
        if inputs_embeds is not None:
            h = inputs_embeds
        else:
            h = self.model.embed_tokens(input_ids) if host is None else host.embed(input_ids)
        if cfg.embed_scale != 1.0:
            h = h * torch.tensor(cfg.embed_scale, dtype=h.dtype)
        tables = {rope: table(position_ids, h.dtype) for rope, table in self._rotary.items()}
        checkpointing = self.gradient_checkpointing and self.training and torch.is_grad_enabled()
        # With checkpointing only each layer's input stays saved; "unsloth" mode parks it in CPU memory too.
        stream = self._host_layers
        # Streamed layers' weight copies share the host link with the inputs' copies back: those go two layers ahead.
        ahead = 1 if stream is None else 2
        session = self._offloader.session(ahead) if checkpointing and self.checkpoint_offload else None
        rng = checkpointing and self.draws_random()  # else the recomputation need not restore generator states
        checked = len(self.model.layers) - self.uncheckpointed_layers  # the layers below are checkpointed
        if stream is not None:
            if torch.is_grad_enabled() and (session is None or any(i >= checked for i in stream.indices)):
                raise GazelleError(
                    "layers streamed from host memory (stream_layers) run with autograd only under offloaded "
                    "checkpointing: train the model in training mode with use_gradient_checkpointing='unsloth' and "
                    "stream none of the uncheckpointed_layers, or run this forward under torch.no_grad()")
            stream.start()
        prefetch = -1
        if host is not None and self.training and torch.is_grad_enabled():
            prefetch = max(0, len(self.model.layers) - host.prefetch_layers)
        for i, layer in enumerate(self.model.layers):
            if i == prefetch:
                host.prefetch_head()  # a loss will follow: the first slices of the head copy under the last layers
            cos, sin = tables[cfg.rope_for(i)]
            mask = masks[cfg.window(i)]
            streamed = stream if stream is not None and i in stream else None
            if session is not None and i < checked:
                h = offloaded_checkpoint(layer, session, i, h, cos, sin, mask, cache, recompute=layer.recompute,
                                         rng=rng, weights=streamed)
            elif checkpointing and i < checked:
                h = checkpoint(layer, h, cos, sin, mask, cache, use_reentrant=False, preserve_rng_state=rng)
            elif streamed is not None:
                with streamed.running(i):
                    h = layer(h, cos, sin, mask, cache)
            else:
                h = layer(h, cos, sin, mask, cache)
        if session is not None and 0 < checked < len(self.model.layers):
            # Backward meets the top checkpointed layer after the uncheckpointed ones: its input comes back under
            # them rather than with the GPU waiting (0.6 ms at llama-8B 2 x 2048), one layer input held meanwhile
            # beside the uncheckpointed layers' activations.
            session.prefetch(checked - 1)
        return self.model.norm(h)

    def draws_random(self) -> bool:
        """Whether a forward draws random numbers (LoRA dropout in training): the trainer keeps CUDA graphs off."""
        return draws_random(self)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """lm_head (and final soft-capping) over hidden states; callers choose which positions.

        A decode step's few rows go through grouped()'s one-weight kernel: benchmarks/multi_linear.py (H100) timed
        the 151,936-row head at 420 us against cuBLAS's 446 (llama-8B, 32 rows) and 168 against 178 (qwen-1.5B,
        64 rows). The o and down projections stay with cuBLAS, which was as fast or faster there."""
        if self._host_embeddings is not None:
            return softcap(F.linear(hidden, self._host_embeddings.head()), self.config.final_softcap)
        logits = grouped(hidden, (self.lm_head,))
        return softcap(self.lm_head(hidden) if logits is None else logits, self.config.final_softcap)

    def linear_head(self) -> tuple[torch.Tensor | HeadSlices, float | None] | None:
        """(lm_head weight, final soft-cap) when `logits` is that plain product, for the fused linear
        cross-entropy; None when the head carries an adapter, a bias or a quantized weight. With the head in host
        memory (HostEmbeddings) the weight is a HeadStream: the loss reads it slice by slice."""
        head = self.lm_head
        if type(head) is not nn.Linear or head.bias is not None:
            return None
        weight = head.weight if self._host_embeddings is None else self._host_embeddings.head_slices()
        return weight, self.config.final_softcap

    def num_parameters(self) -> int:
        return sum(p.numel() for p in {id(p): p for p in self.parameters()}.values())


def build_mask(
    T: int,
    past: int,
    attention_mask: torch.Tensor | None,
    position_ids: torch.Tensor | None,
    window: int | None,
    device: torch.device,
) -> torch.Tensor | None:
    """(B or 1, 1, T, past + T) bool mask, or None when plain causal attention is exact.

    Query t sits at slot past + t. A key is visible when it is not in the future, is a real token,
    lies within the sliding window (slot distance < window), and belongs to the same packed document
    (documents start where position_ids reset to 0).
    """
    needs_window = window is not None and past + T > window
    if attention_mask is None and position_ids is None and past == 0 and not needs_window:
        return None
    q_slot = torch.arange(past, past + T, device=device)[:, None]  # (T, 1)
    k_slot = torch.arange(past + T, device=device)[None, :]  # (1, S)
    allowed = k_slot <= q_slot
    if needs_window:
        allowed = allowed & (k_slot > q_slot - window)
    allowed = allowed[None]  # (1, T, S)
    if attention_mask is not None:
        allowed = allowed & attention_mask.bool()[:, None, :]
    if position_ids is not None:
        doc = (position_ids == 0).cumsum(-1)  # (B, T)
        allowed = allowed & (doc[:, :, None] == doc[:, None, :])
    # A padding query sees nothing; letting it see its own slot keeps softmax finite (its output is unused).
    allowed = allowed | (k_slot == q_slot)[None]
    return allowed[:, None]
