"""Qwen2 language model on packed sequences, dense or Mixture-of-Transformers (MoT), official key names.

Shapes: L packed positions (queries), H hidden, h/hkv query/kv heads, d head_dim.

MoT (`layer_module="Qwen2MoTDecoderLayer"`): every layer holds und weights and `*_moe_gen` twins (q/k/v/o
proj, q/k norms, both layer norms, mlp); the model adds `norm_moe_gen`. A `Routing` says which positions
are gen (VAE latent tokens); `apply_experts` is the one place that sends rows to the und or gen twin.
Attention is ONE joint softmax over all tokens. The dense layer (`Qwen2DecoderLayer`, HF Qwen2 weights) has
no twins and ignores the routing.

KV-cache hook: `Qwen2Attention.forward(..., cache=None)`: after q/k/v projection, q/k norm and RoPE,
`if cache is not None: k, v = cache.update(layer_idx, k, v)`, then the queries attend to all returned keys.
Contract for `cache.update(layer_idx: int, key [Lq, hkv, d], value [Lq, hkv, d]) -> (keys [Lk, hkv, d],
values [Lk, hkv, d])`:
  * `key` is post k_norm + RoPE (what the official NaiveCache stores), `value` is v_proj output;
  * the returned keys are laid out as the `AttentionSpec` of the call says: sample after sample, each
    sample's cached keys followed by its new keys (`AttentionSpec.with_cache(kv_lens, query_lens, mode)`);
  * whether the new keys are stored is the cache's business (the official `_forward_flow` does not store).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from bagel_ft.attention import AttentionSpec, PreparedMask, attend, prepare_mask
from bagel_ft.config import LLMConfig

# ---- routing ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Routing:
    """Hard MoT routing of L packed positions: `gen` rows use the `*_moe_gen` twins, `und` rows the others.

    Both None = every position und (mode 'und': text, ViT, decoding)."""

    und: Tensor | None = None  # [Lu] sorted positions
    gen: Tensor | None = None  # [Lg] positions

    @classmethod
    def for_mode(cls, mode: str, length: int, gen_indexes: Tensor | None = None) -> Routing:
        """'und': all positions und; 'gen': `gen_indexes` gen, every other position und."""
        if mode == "und":
            return cls()
        if mode != "gen":
            raise ValueError(f"routing mode must be 'und' or 'gen', got {mode!r}")
        if gen_indexes is None:
            raise ValueError("routing mode 'gen' needs gen_indexes (the VAE latent token positions)")
        is_und = torch.ones(length, dtype=torch.bool, device=gen_indexes.device)
        is_und[gen_indexes] = False
        return cls(und=is_und.nonzero().squeeze(1), gen=gen_indexes)


FEW_ROWS = 1 / 8  # an expert with at most this fraction of the rows is applied to its rows alone (below)


def apply_experts(und: nn.Module, gen: nn.Module | None, x: Tensor, routing: Routing) -> Tensor:
    """The one place MoT routing happens: rows `routing.gen` of x [L, ...] go through `gen`, the rest `und`.

    Every expert module is row-wise, so when the und rows are few (an image block: 2 of n + 2 rows), `gen`
    runs on all rows and the und rows are overwritten: the same values, without gathering and scattering
    almost every row (the bulk of a batched flow forward's memory traffic); the waste is <= FEW_ROWS."""
    if gen is None or routing.gen is None:
        return und(x)
    if isinstance(und, nn.Identity) and isinstance(gen, nn.Identity):  # no QK norm: nothing to route
        return x
    n_und = routing.und.numel()
    if n_und == 0:
        return gen(x)
    if n_und <= FEW_ROWS * x.shape[0]:
        y = gen(x)
        y[routing.und] = und(x.index_select(0, routing.und))
        return y
    y_und, y_gen = und(x[routing.und]), gen(x[routing.gen])
    y = y_und.new_empty((x.shape[0], *y_und.shape[1:]))
    y[routing.und] = y_und
    y[routing.gen] = y_gen
    return y


# ---- building blocks --------------------------------------------------------------------------------


class Qwen2RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, x: Tensor) -> Tensor:
        dtype = x.dtype  # statistics in float32 whatever the model dtype (as HF Qwen2)
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return self.weight * x.to(dtype)


class Qwen2RotaryEmbedding(nn.Module):
    """RoPE tables from per-token position ids (1-D, BAGEL's packed ids)."""

    def __init__(self, config: LLMConfig, device=None):
        super().__init__()
        self.head_dim, self.rope_theta = config.head_dim, config.rope_theta
        self.register_buffer("inv_freq", self._inv_freq(device), persistent=False)

    def _inv_freq(self, device) -> Tensor:  # [d/2] radians per position
        exponents = torch.arange(0, self.head_dim, 2, dtype=torch.int64, device=device).float() / self.head_dim
        return 1.0 / (self.rope_theta**exponents)

    def _apply(self, fn, recurse=True):
        # .to(bf16) / to_empty would ruin the table (bf16 phase errors grow with position, to_empty leaves
        # garbage): recompute it in float32 on the new device instead.
        super()._apply(fn, recurse)
        if self.inv_freq.device.type != "meta":
            self.inv_freq = self._inv_freq(self.inv_freq.device)
        return self

    def forward(self, position_ids: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """position_ids [L] -> cos, sin [L, d] (the d/2 frequencies repeated twice: rotate_half layout)."""
        freqs = position_ids.float()[:, None] * self.inv_freq.float()[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(dtype), emb.sin().to(dtype)


def rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary_pos_emb(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
    """q [L, h, d], k [L, hkv, d], cos/sin [L, d] (broadcast over heads)."""
    cos, sin = cos[:, None, :], sin[:, None, :]
    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


class Qwen2MLP(nn.Module):
    def __init__(self, config: LLMConfig):
        super().__init__()
        if config.hidden_act != "silu":
            raise ValueError(f"llm.hidden_act: only 'silu' (Qwen2) is supported, got {config.hidden_act!r}")
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


# ---- attention and layers -----------------------------------------------------------------------------


class Qwen2Attention(nn.Module):
    """GQA self-attention with q/k/v biases, optional per-head QK RMSNorm (before RoPE), optional gen twins."""

    def __init__(self, config: LLMConfig, layer_idx: int, mot: bool):
        super().__init__()
        self.layer_idx = layer_idx
        self.head_dim = config.head_dim
        hidden, q_dim, kv_dim = (
            config.hidden_size,
            config.num_attention_heads * self.head_dim,
            config.num_key_value_heads * self.head_dim,
        )

        def norm():
            return Qwen2RMSNorm(self.head_dim, config.rms_norm_eps) if config.qk_norm else nn.Identity()

        # creation order = official state_dict order
        self.q_proj = nn.Linear(hidden, q_dim, bias=True)
        self.k_proj = nn.Linear(hidden, kv_dim, bias=True)
        self.v_proj = nn.Linear(hidden, kv_dim, bias=True)
        self.o_proj = nn.Linear(q_dim, hidden, bias=False)
        self.q_norm, self.k_norm = norm(), norm()
        self.q_norm_moe_gen = norm() if mot else None
        self.k_norm_moe_gen = norm() if mot else None
        self.q_proj_moe_gen = nn.Linear(hidden, q_dim, bias=True) if mot else None
        self.k_proj_moe_gen = nn.Linear(hidden, kv_dim, bias=True) if mot else None
        self.v_proj_moe_gen = nn.Linear(hidden, kv_dim, bias=True) if mot else None
        self.o_proj_moe_gen = nn.Linear(q_dim, hidden, bias=False) if mot else None

    def forward(
        self, x: Tensor, rope: tuple[Tensor, Tensor], routing: Routing, mask: PreparedMask, cache=None
    ) -> Tensor:
        """x [L, H] (already input-normed) -> [L, H]. See the module docstring for the `cache` contract."""

        def heads(t: Tensor) -> Tensor:
            return rearrange(t, "l (h d) -> l h d", d=self.head_dim)

        q = heads(apply_experts(self.q_proj, self.q_proj_moe_gen, x, routing))
        k = heads(apply_experts(self.k_proj, self.k_proj_moe_gen, x, routing))
        v = heads(apply_experts(self.v_proj, self.v_proj_moe_gen, x, routing))
        q = apply_experts(self.q_norm, self.q_norm_moe_gen, q, routing)
        k = apply_experts(self.k_norm, self.k_norm_moe_gen, k, routing)
        q, k = apply_rotary_pos_emb(q, k, *rope)
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v)
        out = rearrange(attend(q, k, v, mask), "l h d -> l (h d)")
        return apply_experts(self.o_proj, self.o_proj_moe_gen, out, routing)


class Qwen2DecoderLayer(nn.Module):
    """Dense pre-norm layer (HF Qwen2). Subclass `Qwen2MoTDecoderLayer` adds the gen twins."""

    mot = False

    def __init__(self, config: LLMConfig, layer_idx: int):
        super().__init__()
        mot, eps = self.mot, config.rms_norm_eps
        self.self_attn = Qwen2Attention(config, layer_idx, mot)
        self.mlp = Qwen2MLP(config)
        self.mlp_moe_gen = Qwen2MLP(config) if mot else None
        self.input_layernorm = Qwen2RMSNorm(config.hidden_size, eps)
        self.input_layernorm_moe_gen = Qwen2RMSNorm(config.hidden_size, eps) if mot else None
        self.post_attention_layernorm = Qwen2RMSNorm(config.hidden_size, eps)
        self.post_attention_layernorm_moe_gen = Qwen2RMSNorm(config.hidden_size, eps) if mot else None

    def forward(
        self, x: Tensor, rope: tuple[Tensor, Tensor], routing: Routing, mask: PreparedMask, cache=None
    ) -> Tensor:
        h = apply_experts(self.input_layernorm, self.input_layernorm_moe_gen, x, routing)
        x = x + self.self_attn(h, rope, routing, mask, cache)
        h = apply_experts(self.post_attention_layernorm, self.post_attention_layernorm_moe_gen, x, routing)
        return x + apply_experts(self.mlp, self.mlp_moe_gen, h, routing)


class Qwen2MoTDecoderLayer(Qwen2DecoderLayer):
    """MoT layer: und weights + `*_moe_gen` twins of every attention / MLP / norm weight."""

    mot = True


LAYER_CLASSES = {"Qwen2DecoderLayer": Qwen2DecoderLayer, "Qwen2MoTDecoderLayer": Qwen2MoTDecoderLayer}


# ---- model ----------------------------------------------------------------------------------------------


class Qwen2Model(nn.Module):
    def __init__(self, config: LLMConfig):
        super().__init__()
        self.config = config
        self.attn_backend = "sdpa"  # the one switch: "sdpa" | "flex" | "flash" (bagel_ft.attention)
        layer_cls = LAYER_CLASSES[config.layer_module]
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(layer_cls(config, i) for i in range(config.num_hidden_layers))
        self.norm = Qwen2RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.norm_moe_gen = Qwen2RMSNorm(config.hidden_size, config.rms_norm_eps) if config.is_mot else None
        self.rotary_emb = Qwen2RotaryEmbedding(config)

    def forward(
        self,
        packed_sequence: Tensor,
        packed_position_ids: Tensor,
        attn: AttentionSpec | PreparedMask,
        routing: Routing | None = None,
        cache=None,
    ) -> Tensor:
        """packed_sequence [L, H] input embeddings, packed_position_ids [L] RoPE ids -> final hidden [L, H].

        `attn` describes the layout (an `AttentionSpec`, prepared here with `self.attn_backend`, or a
        `PreparedMask`); `routing` defaults to all-und; `cache` is the per-layer KV hook (module docstring)."""
        routing = routing or Routing()
        mask = attn if isinstance(attn, PreparedMask) else prepare_mask(attn, self.attn_backend, packed_sequence.device)
        rope = self.rotary_emb(packed_position_ids, packed_sequence.dtype)
        x = packed_sequence
        for layer in self.layers:
            x = layer(x, rope, routing, mask, cache)
        return apply_experts(self.norm, self.norm_moe_gen, x, routing)


class Qwen2ForCausalLM(nn.Module):
    """`model` (Qwen2Model) + `lm_head`: the official `language_model` of Bagel."""

    def __init__(self, config: LLMConfig):
        super().__init__()
        self.config = config
        self.model = Qwen2Model(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(
        self,
        packed_sequence: Tensor,
        packed_position_ids: Tensor,
        attn: AttentionSpec | PreparedMask,
        mode: str = "und",
        gen_indexes: Tensor | None = None,
        cache=None,
    ) -> Tensor:
        """Run the LLM on a packed sequence in routing `mode` ('und' | 'gen', see `Routing.for_mode`) -> hidden [L, H]."""
        routing = Routing.for_mode(mode, packed_sequence.shape[0], gen_indexes)
        return self.model(packed_sequence, packed_position_ids, attn, routing, cache)

    @torch.no_grad()
    def init_weights(self) -> None:
        """Official init: Linear/Embedding ~ N(0, initializer_range), biases 0, norms 1; then every
        `*_moe_gen` twin starts as a copy of its und weight (official `init_moe`)."""
        std = self.config.initializer_range
        for module in self.modules():
            if isinstance(module, nn.Linear | nn.Embedding):
                module.weight.normal_(0.0, std)
                if getattr(module, "bias", None) is not None:
                    module.bias.zero_()
            elif isinstance(module, Qwen2RMSNorm):
                module.weight.fill_(1.0)
        params = dict(self.named_parameters())
        for name, param in params.items():
            if "_moe_gen" in name:
                param.copy_(params[name.replace("_moe_gen", "")])
