"""LoRA as a wrapper: matching `nn.Linear`s are swapped for `LoRALinear` (a Linear subclass), nothing in the
model branches on it.

    y = x W^T + b + (alpha / r) * dropout(x) A^T B^T        A [r, in] ~ kaiming, B [out, r] = 0 (starts as identity)

`LoRALinear` keeps the base `weight` / `bias` under their original names, so the model's state-dict keys are
unchanged apart from the added `lora_A.weight` / `lora_B.weight`; `merge_lora` folds the adapters back into
plain Linears (W += alpha/r * B A) for export in the official layout.
"""

from __future__ import annotations

import math
import zlib

import torch
from torch import nn


class LoRALinear(nn.Linear):
    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0):
        nn.Module.__init__(self)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight, self.bias = base.weight, base.bias  # shared with the frozen base, same keys
        self.rank, self.scale = rank, alpha / rank
        self.lora_A = nn.Linear(base.in_features, rank, bias=False, device=base.weight.device, dtype=base.weight.dtype)
        self.lora_B = nn.Linear(rank, base.out_features, bias=False, device=base.weight.device, dtype=base.weight.dtype)
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        init_adapter_weight_("lora_A", self.lora_A.weight)
        init_adapter_weight_("lora_B", self.lora_B.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) + self.lora_B(self.lora_A(self.lora_dropout(x))) * self.scale

    @torch.no_grad()
    def merged(self) -> nn.Linear:
        out = nn.Linear(
            self.in_features,
            self.out_features,
            bias=self.bias is not None,
            device=self.weight.device,
            dtype=self.weight.dtype,
        )
        out.weight.copy_(merged_weight(self.weight, self.lora_A.weight, self.lora_B.weight, self.scale))
        if self.bias is not None:
            out.bias.copy_(self.bias)
        return out


def merged_weight(weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, scale: float) -> torch.Tensor:
    """The plain Linear weight a LoRALinear computes with: W + scale B A."""
    return weight + scale * (lora_B @ lora_A)


@torch.no_grad()
def init_adapter_weight_(name: str, weight: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """A (`lora_A`) kaiming-uniform like nn.Linear's default, B zero: the adapted layer starts as the base."""
    if "lora_A" in name:
        return nn.init.kaiming_uniform_(weight, a=math.sqrt(5), generator=generator)
    return nn.init.zeros_(weight)


def initial_adapter_weight(name: str, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """The initial value of adapter weight `name` (`*.lora_A.weight` / `*.lora_B.weight`), the same on every
    rank (generator seeded by the run seed and the name): for models materialised after sharding."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
    return init_adapter_weight_(name, torch.empty(shape), generator)


def _matches(name: str, targets: list[str]) -> bool:
    leaf = name.rsplit(".", 1)[-1]
    return any(leaf == t or leaf == f"{t}_moe_gen" for t in targets)


def apply_lora(
    model: nn.Module, targets: list[str], rank: int, alpha: float, dropout: float = 0.0, under: str = "language_model."
) -> list[str]:
    """Freeze every parameter, then wrap the Linears named in `targets` (under `under`) with trainable adapters."""
    model.requires_grad_(False)
    wrapped = []
    for name, module in list(model.named_modules()):
        if (
            isinstance(module, nn.Linear)
            and not isinstance(module, LoRALinear)
            and name.startswith(under)
            and _matches(name, targets)
        ):
            parent_name, _, leaf = name.rpartition(".")
            lora = LoRALinear(module, rank, alpha, dropout)
            lora.lora_A.requires_grad_(True)
            lora.lora_B.requires_grad_(True)
            setattr(model.get_submodule(parent_name), leaf, lora)
            wrapped.append(name)
    if not wrapped:
        raise ValueError(f"lora.targets {targets} matched no nn.Linear under {under!r}")
    return wrapped


def merge_lora(model: nn.Module) -> nn.Module:
    """Replace every LoRALinear by its merged plain Linear (in place); returns the model."""
    for name, module in list(model.named_modules()):
        if isinstance(module, LoRALinear):
            parent_name, _, leaf = name.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, leaf, module.merged())
    return model
