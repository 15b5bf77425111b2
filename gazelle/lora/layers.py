"""LoRA layers and their config.

Modules keep PEFT's in-memory naming (`q_proj.base_layer`, `q_proj.lora_A`, `embed_tokens.lora_embedding_A`),
so an adapter file's keys are the in-model names behind a prefix. LoRA parameters are float32 whatever the
base dtype (they are small, and the optimizer wants full precision); the forward casts them to the
activation dtype, so the adapter path costs no more than the base one.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from gazelle.errors import GazelleError
from gazelle.kernels.lora import fusable, lora_linear

BIAS_MODES = ("none", "lora_only", "all")


@dataclass
class LoraConfig:
    """What to adapt and how; field names and meanings are PEFT's, so adapter_config.json maps 1:1."""

    r: int = 16
    lora_alpha: float = 16
    lora_dropout: float = 0.0
    target_modules: list[str] | str = "all-linear"
    """Module names matched on their trailing components ("q_proj", "self_attn.q_proj"), "all-linear"
    (every linear layer inside the decoder layers), or any other string: a regex over the full module name."""
    bias: str = "none"
    """Which biases train: none, lora_only (those of LoRA-wrapped layers) or all."""
    use_rslora: bool = False
    layers_to_transform: list[int] | None = None
    modules_to_save: list[str] | None = None
    init_lora_weights: bool | str = True
    random_state: int = 3407
    loftq_config: dict = field(default_factory=dict)

    def __post_init__(self):
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r < 1:
            raise GazelleError(f"LoraConfig.r must be a positive integer, got {self.r!r}")
        alpha = self.lora_alpha
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not alpha > 0:
            raise GazelleError(f"LoraConfig.lora_alpha must be a positive number, got {self.lora_alpha!r}")
        if not isinstance(self.lora_dropout, (int, float)) or not 0 <= self.lora_dropout < 1:
            raise GazelleError(f"LoraConfig.lora_dropout must be in [0, 1), got {self.lora_dropout!r}")
        if self.bias not in BIAS_MODES:
            raise GazelleError(f"LoraConfig.bias must be one of {', '.join(BIAS_MODES)}, got {self.bias!r}")
        if not isinstance(self.target_modules, str):
            # A set (as PEFT keeps it) is sorted so configs written from it are reproducible.
            names = self.target_modules
            self.target_modules = sorted(names) if isinstance(names, (set, frozenset)) else list(names)
            if not self.target_modules or not all(isinstance(t, str) and t for t in self.target_modules):
                raise GazelleError(
                    f"LoraConfig.target_modules must be module names like ['q_proj', 'v_proj'] or 'all-linear', "
                    f"got {self.target_modules!r}"
                )
        if isinstance(self.layers_to_transform, int) and not isinstance(self.layers_to_transform, bool):
            self.layers_to_transform = [self.layers_to_transform]
        if self.layers_to_transform is not None:
            self.layers_to_transform = list(self.layers_to_transform) or None  # PEFT treats [] as "all layers"
            if self.layers_to_transform and not all(
                isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in self.layers_to_transform
            ):
                raise GazelleError(
                    f"LoraConfig.layers_to_transform must be layer indices like [0, 1], "
                    f"got {self.layers_to_transform!r}"
                )
        if self.modules_to_save:
            raise GazelleError(
                f"modules_to_save {self.modules_to_save!r} is not supported yet; put those modules in target_modules "
                "to train them with LoRA instead"
            )
        self.modules_to_save = None
        if self.loftq_config:
            raise GazelleError("LoftQ is not supported yet; use init_lora_weights=True")
        self.loftq_config = {}  # None (accepted) is written as PEFT's empty default
        if not (isinstance(self.init_lora_weights, bool) or self.init_lora_weights == "gaussian"):
            raise GazelleError(
                f"LoraConfig.init_lora_weights {self.init_lora_weights!r} is not supported; "
                "use True, False or 'gaussian'"
            )

    @property
    def scaling(self) -> float:
        return lora_scaling(self.r, self.lora_alpha, self.use_rslora)


def lora_scaling(r: int, alpha: float, use_rslora: bool) -> float:
    # rsLoRA divides by sqrt(r) so the update's scale does not shrink as the rank grows.
    return alpha / math.sqrt(r) if use_rslora else alpha / r


def device_of(module: nn.Module) -> torch.device:
    """Where a base layer lives; a 4-bit layer may hold its weight in a buffer rather than a parameter."""
    first = next(itertools.chain(module.parameters(), module.buffers()), None)
    return first.device if first is not None else torch.device("cpu")


def _draw(shape: torch.Size, kind: str, generator: torch.Generator, std: float = 1.0) -> torch.Tensor:
    """A float32 CPU tensor drawn from `generator`: the same values whatever device the layer is on."""
    t = torch.empty(shape)
    if kind == "kaiming":  # nn.Linear's own init: U(-1/sqrt(fan_in), 1/sqrt(fan_in))
        return nn.init.kaiming_uniform_(t, a=math.sqrt(5), generator=generator)
    if kind == "normal":
        return nn.init.normal_(t, std=std, generator=generator)
    return t.zero_()


def _default_generator() -> torch.Generator:
    return torch.Generator().manual_seed(LoraConfig.random_state)


class LoraLinear(nn.Module):
    """base_layer(x) + lora_B(lora_A(dropout(x))) * scaling; the base (nn.Linear or Linear4bit) stays untouched."""

    def __init__(
        self,
        base_layer: nn.Module,
        r: int,
        lora_alpha: float,
        lora_dropout: float = 0.0,
        use_rslora: bool = False,
        bias_mode: str = "none",
        *,
        init_lora_weights: bool | str = True,
        generator: torch.Generator | None = None,
    ):
        super().__init__()
        self.base_layer = base_layer
        self.in_features, self.out_features = base_layer.in_features, base_layer.out_features
        self.r, self.lora_alpha, self.use_rslora = r, lora_alpha, use_rslora
        self.scaling = lora_scaling(r, lora_alpha, use_rslora)
        self.lora_dropout = nn.Dropout(lora_dropout) if lora_dropout > 0 else nn.Identity()
        device = device_of(base_layer)
        # skip_init: nn.Linear's own init would draw from (and advance) the global RNG.
        fp32 = dict(bias=False, device=device, dtype=torch.float32)
        self.lora_A = nn.utils.skip_init(nn.Linear, self.in_features, r, **fp32)
        self.lora_B = nn.utils.skip_init(nn.Linear, r, self.out_features, **fp32)
        self.reset_lora_parameters(init_lora_weights, generator or _default_generator())
        bias = getattr(base_layer, "bias", None)
        if isinstance(bias, nn.Parameter):
            bias.requires_grad_(bias_mode != "none")

    @torch.no_grad()
    def reset_lora_parameters(self, init_lora_weights: bool | str, generator: torch.Generator) -> None:
        """PEFT's inits: True = A kaiming-uniform, B zero (the adapter starts as a no-op);
        "gaussian" = A ~ N(0, 1/r), B zero; False = both kaiming-uniform (a random, non-identity start)."""
        a = "normal" if init_lora_weights == "gaussian" else "kaiming"
        b = "kaiming" if init_lora_weights is False else "zeros"
        self.lora_A.weight.copy_(_draw(self.lora_A.weight.shape, a, generator, std=1 / self.r))
        self.lora_B.weight.copy_(_draw(self.lora_B.weight.shape, b, generator))

    def __setattr__(self, name, value):
        # Decoder.tie_weights assigns `lm_head.weight = embed_tokens.weight`; the tie belongs on the base layer
        # (registering it here would add a stray parameter and leave the base untied).
        if name == "weight" and "base_layer" in self._modules:
            setattr(self.base_layer, name, value)
        else:
            super().__setattr__(name, value)

    def delta_weight(self) -> torch.Tensor:
        """B @ A * scaling in float32, shaped like the base weight (out, in)."""
        return self.lora_B.weight.float() @ self.lora_A.weight.float() * self.scaling

    disabled = False
    """True while adapters_disabled() is active: the layer is its base alone (GRPO's reference policy)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        adapted = fusable(x, self)
        if adapted:  # one autograd node, saving x and x A^T only
            return lora_linear(x, *adapted)
        result = self.base_layer(x)
        if self.disabled:
            return result
        a, b = self.lora_A.weight.to(x.dtype), self.lora_B.weight.to(x.dtype)
        return result + F.linear(F.linear(self.lora_dropout(x), a), b) * self.scaling

    def extra_repr(self) -> str:
        return f"r={self.r}, lora_alpha={self.lora_alpha}, scaling={self.scaling:g}"


class LoraEmbedding(nn.Module):
    """base(ids) + embedding(ids, A.T) @ B.T * scaling, with PEFT's parameters lora_embedding_A (r, vocab)
    and lora_embedding_B (hidden, r)."""

    def __init__(
        self,
        base_layer: nn.Embedding,
        r: int,
        lora_alpha: float,
        use_rslora: bool = False,
        *,
        init_lora_weights: bool | str = True,
        generator: torch.Generator | None = None,
    ):
        super().__init__()
        self.base_layer = base_layer
        self.num_embeddings, self.embedding_dim = base_layer.num_embeddings, base_layer.embedding_dim
        self.r, self.lora_alpha, self.use_rslora = r, lora_alpha, use_rslora
        self.scaling = lora_scaling(r, lora_alpha, use_rslora)
        device = device_of(base_layer)
        self.lora_embedding_A = nn.Parameter(torch.empty(r, self.num_embeddings, device=device, dtype=torch.float32))
        self.lora_embedding_B = nn.Parameter(torch.empty(self.embedding_dim, r, device=device, dtype=torch.float32))
        self.reset_lora_parameters(init_lora_weights, generator or _default_generator())

    @torch.no_grad()
    def reset_lora_parameters(self, init_lora_weights: bool | str, generator: torch.Generator) -> None:
        """PEFT's inits for embeddings: A zero, B ~ N(0, 1) (for True and "gaussian"); False = both N(0, 1)."""
        a = "normal" if init_lora_weights is False else "zeros"
        self.lora_embedding_A.copy_(_draw(self.lora_embedding_A.shape, a, generator))
        self.lora_embedding_B.copy_(_draw(self.lora_embedding_B.shape, "normal", generator))

    @property
    def weight(self) -> torch.Tensor:
        """The frozen base table (what a tied lm_head shares); the adapter is not in it."""
        return self.base_layer.weight

    def delta_weight(self) -> torch.Tensor:
        """(B @ A).T * scaling in float32, shaped like the base table (vocab, hidden)."""
        return (self.lora_embedding_B.float() @ self.lora_embedding_A.float()).T * self.scaling

    disabled = False

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        result = self.base_layer(ids)
        if self.disabled:
            return result
        a, b = self.lora_embedding_A.to(result.dtype), self.lora_embedding_B.to(result.dtype)
        # padding_idx as the base has it, so the pad row of A gets no gradient either.
        after_a = F.embedding(ids, a.T, padding_idx=self.base_layer.padding_idx)
        return result + (after_a @ b.T) * self.scaling

    def extra_repr(self) -> str:
        return f"r={self.r}, lora_alpha={self.lora_alpha}, scaling={self.scaling:g}"
