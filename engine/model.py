"""Our Llama-family model (llama, mistral, qwen2) over a flat batch of tokens from many requests.

One module per concept, in the manner of gpt-fast; q/k/v and gate/up projections
are fused at load time so each layer runs two large matmuls instead of five.
"""

from dataclasses import dataclass
import math
from typing import Iterable

import torch
from torch import nn
import torch.nn.functional as F

from engine.attention import AttentionMetadata, paged_attention

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")


@dataclass(slots=True)
class ModelArgs:
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    max_position_embeddings: int
    rope_theta: float
    rope_scaling: dict | None
    tie_word_embeddings: bool
    qkv_bias: bool
    o_bias: bool

    @classmethod
    def from_hf_config(cls, config) -> "ModelArgs":
        if config.model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(f"model type {config.model_type!r} is not supported; supported: {SUPPORTED_MODEL_TYPES}")
        # transformers 5 folds theta and scaling into `rope_parameters`; 4.x keeps them apart.
        rope = dict(getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {})
        rope_theta = rope.pop("rope_theta", None) or getattr(config, "rope_theta", 10000.0)
        if rope.get("rope_type", rope.get("type", "default")) == "default":
            rope = {}
        attention_bias = bool(getattr(config, "attention_bias", False))
        num_heads = config.num_attention_heads
        return cls(
            model_type=config.model_type,
            vocab_size=config.vocab_size,
            hidden_size=config.hidden_size,
            intermediate_size=config.intermediate_size,
            num_layers=config.num_hidden_layers,
            num_heads=num_heads,
            num_kv_heads=getattr(config, "num_key_value_heads", None) or num_heads,
            head_dim=getattr(config, "head_dim", None) or config.hidden_size // num_heads,
            rms_norm_eps=config.rms_norm_eps,
            max_position_embeddings=config.max_position_embeddings,
            rope_theta=float(rope_theta),
            rope_scaling=rope or None,
            tie_word_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
            qkv_bias=attention_bias or config.model_type == "qwen2",
            o_bias=attention_bias,
        )


def rope_inverse_frequencies(args: ModelArgs) -> torch.Tensor:
    dim = args.head_dim
    # float32 throughout, as the reference implementation computes it, so positions rotate identically.
    inv_freq = 1.0 / (args.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64, device="cpu").float() / dim))
    scaling = args.rope_scaling
    if not scaling:
        return inv_freq
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind == "linear":
        return inv_freq / scaling["factor"]
    if kind == "llama3":
        # Llama 3.1: long wavelengths slowed by `factor`, short kept, a smooth ramp between.
        factor = scaling["factor"]
        low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
        old_len = scaling["original_max_position_embeddings"]
        wavelength = 2 * math.pi / inv_freq
        smooth = (old_len / wavelength - low) / (high - low)
        scaled = torch.where(wavelength > old_len / low, inv_freq / factor, inv_freq)
        ramp = (1 - smooth) * inv_freq / factor + smooth * inv_freq
        middle = (wavelength <= old_len / low) & (wavelength >= old_len / high)
        return torch.where(middle, ramp, scaled)
    raise ValueError(f"rope scaling {kind!r} is not supported")


class RotaryEmbedding:
    """cos/sin tables in float32 whatever the model's dtype (so not module buffers).

    Computed on the CPU explicitly, so a model built on the meta device still gets real tables.
    """

    def __init__(self, args: ModelArgs, max_positions: int, device: torch.device | str = "cpu"):
        positions = torch.arange(max_positions, dtype=torch.float32, device="cpu")
        freqs = torch.outer(positions, rope_inverse_frequencies(args))
        self.cos = freqs.cos().to(device)  # [positions, head_dim / 2]
        self.sin = freqs.sin().to(device)

    def lookup(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin [tokens, head_dim / 2] for a step's positions, looked up once for every layer."""
        return self.cos[positions], self.sin[positions]


class TorchLayerOps:
    """A layer's small ops in torch: on every device, and the reference that the CPU kernel's
    fused ones (`KernelLayerOps`) are tested against."""

    @staticmethod
    def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        # Normalised in float32 and rounded to the model's dtype before the weight, as the
        # reference does: fused with the weight, bfloat16 answers drift from transformers'.
        return weight * F.rms_norm(x.float(), weight.shape, eps=eps).to(x.dtype)

    @classmethod
    def add_rms_norm(cls, x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        """`residual += x` in place, then the sum's RMSNorm."""
        return cls.rms_norm(residual.add_(x), weight, eps)

    @staticmethod
    def rotate(qk: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """qk: [tokens, heads, head_dim], halves split as in Hugging Face Llama. May rotate in
        place (the kernel's does): use what it returns."""
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        first, second = qk.float().chunk(2, dim=-1)
        return torch.cat((first * cos - second * sin, second * cos + first * sin), dim=-1).to(qk.dtype)

    @staticmethod
    def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
        gate, up = gate_up.chunk(2, dim=-1)
        return F.silu(gate) * up


class KernelLayerOps:
    """The same ops, each one call into the CPU kernel's build (engine/csrc/layer_ops.cpp):
    a decode step's rows are too few for torch's several ops each to pay for themselves."""

    def __init__(self, kernels):
        self.rms_norm = kernels.rms_norm
        self.add_rms_norm = kernels.add_rms_norm
        self.rotate = kernels.rotary_embedding
        self.silu_and_mul = kernels.silu_and_mul


def bucket_rows(rows: int) -> int:
    """The row count a PackedLinear hands oneDNN for `rows`: exact up to 32, then rounded up
    on a grid of 16 steps per power of two (at most 1/16 more rows, 2% on average).

    oneDNN builds a kernel for every shape it meets and keeps it in two LRU caches (ideep's
    and its own, 1,024 entries each, ~0.5 MB an entry at this model's shapes). A server meets
    every token count from 1 to the step budget, so unrounded the resident set kept growing
    (a probe: +550 MiB for 511 shapes, flat with both caches capped; issue 13, BENCHMARKS.md). On the grid, a
    2,048-token budget has 128 shapes per layer: the caches hold them all and stay small.
    """
    if rows <= 32:
        return rows
    step = 1 << (rows.bit_length() - 5)
    return -(-rows // step) * step


class PackedLinear(nn.Module):
    """A Linear whose weight oneDNN lays out for its CPU kernels once, at load time.

    For bfloat16 on CPU, measured against `F.linear` at this model's shapes: 1.2x faster
    at 64 rows, 2-2.5x at 1-4 rows; for float32 on AVX-512, 1.2-4x from 4 to 200 rows
    (BENCHMARKS.md). Rows are padded with zeros to
    `bucket_rows` and cut off again. A real row can then differ from the unpadded product
    in its last bit, as it already may between any two row counts: oneDNN blocks by shape.
    """

    def __init__(self, linear: nn.Linear, rows_hint: int = 64):
        super().__init__()
        # A plain attribute, not a parameter: oneDNN's layout is opaque to torch.
        self.packed_weight = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach(), rows_hint)
        self.bias = linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.shape[0]
        padded = bucket_rows(rows) if x.dim() == 2 else rows
        if padded != rows:
            x = F.pad(x, (0, 0, 0, padded - rows))
        out = torch.ops.mkldnn._linear_pointwise(x, self.packed_weight, self.bias, "none", [], "")
        return out[:rows] if padded != rows else out


def use_layer_ops(model: nn.Module, ops) -> None:
    """Run every norm, rotation and gated activation of `model` through `ops`."""
    for module in model.modules():
        if isinstance(module, (RMSNorm, Attention, FeedForward)):
            module.ops = ops


def pack_linears_for_cpu(model: nn.Module) -> None:
    """Swap every Linear for a PackedLinear (where `engine.loader.linear_path` says so)."""
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear):
                setattr(parent, name, PackedLinear(child))


class RMSNorm(nn.Module):
    ops = TorchLayerOps  # or a KernelLayerOps, set by use_layer_ops

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ops.rms_norm(x, self.weight, self.eps)

    def add_and_norm(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        """`residual += x` in place, and the sum normed: one pass where the ops fuse them."""
        return self.ops.add_rms_norm(x, residual, self.weight, self.eps)


class Attention(nn.Module):
    ops = TorchLayerOps

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = args.num_heads, args.num_kv_heads, args.head_dim
        self.q_size = args.num_heads * args.head_dim
        self.kv_size = args.num_kv_heads * args.head_dim
        self.qkv_proj = nn.Linear(args.hidden_size, self.q_size + 2 * self.kv_size, bias=args.qkv_bias)
        self.o_proj = nn.Linear(self.q_size, args.hidden_size, bias=args.o_bias)
        self.scale = args.head_dim ** -0.5

    def forward(self, x, rope: tuple[torch.Tensor, torch.Tensor], kv_cache, meta: AttentionMetadata):
        qk, v = self.qkv_proj(x).split([self.q_size + self.kv_size, self.kv_size], dim=-1)
        # Queries and keys rotated together: half the small ops of rotating each.
        qk = self.ops.rotate(qk.view(-1, self.num_heads + self.num_kv_heads, self.head_dim), *rope)
        q, k = qk.split([self.num_heads, self.num_kv_heads], dim=1)
        v = v.view(-1, self.num_kv_heads, self.head_dim)
        out = paged_attention(q, k, v, kv_cache[0], kv_cache[1], meta, self.scale)
        return self.o_proj(out.reshape(-1, self.q_size))


class FeedForward(nn.Module):
    ops = TorchLayerOps

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.gate_up_proj = nn.Linear(args.hidden_size, 2 * args.intermediate_size, bias=False)
        self.down_proj = nn.Linear(args.intermediate_size, args.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.ops.silu_and_mul(self.gate_up_proj(x)))


class DecoderLayer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.input_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.self_attn = Attention(args)
        self.post_attention_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.mlp = FeedForward(args)

    def forward(self, x, rope, kv_cache, meta):
        """`x`, the residual stream, is added to in place (the model's own tensor, fresh each step)."""
        attended = self.self_attn(self.input_layernorm(x), rope, kv_cache, meta)
        return x.add_(self.mlp(self.post_attention_layernorm.add_and_norm(attended, x)))


class LlamaForCausalLM(nn.Module):
    def __init__(self, args: ModelArgs, max_positions: int, device: torch.device | str = "cpu"):
        super().__init__()
        self.args = args
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(args) for _ in range(args.num_layers))
        self.norm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.lm_head = nn.Linear(args.hidden_size, args.vocab_size, bias=False)
        if args.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.rotary = RotaryEmbedding(args, max_positions, device)

    @property
    def layer_ops_path(self) -> str:
        """What runs the norms, rotations and gated activations (`use_layer_ops`)."""
        return "C++ kernel, fused" if isinstance(self.norm.ops, KernelLayerOps) else "torch"

    def forward(self, input_ids, positions, kv_caches: torch.Tensor, meta: AttentionMetadata):
        """kv_caches: [layers, 2, slots, kv_heads, head_dim]; returns hidden states [tokens, hidden]."""
        x = self.embed_tokens(input_ids)
        rope = self.rotary.lookup(positions)
        for layer, kv_cache in zip(self.layers, kv_caches):
            x = layer(x, rope, kv_cache, meta)
        return x

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        # Called only on the positions that sample: the vocabulary projection is a fifth of the FLOPs.
        return self.lm_head(self.norm(hidden))

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Load Hugging Face tensors, packing q/k/v and gate/up into the fused projections."""
        params = dict(self.named_parameters())
        fused = {
            "q_proj": ("qkv_proj", 0), "k_proj": ("qkv_proj", 1), "v_proj": ("qkv_proj", 2),
            "gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1),
        }
        loaded = set()
        for name, tensor in weights:
            name = name.removeprefix("model.")
            if "rotary_emb" in name or (name == "lm_head.weight" and self.args.tie_word_embeddings):
                continue
            parts = name.split(".")
            if len(parts) >= 2 and parts[-2] in fused:
                target, shard = fused[parts[-2]]
                parts[-2] = target
                param = params[".".join(parts)]
                offset, size = self._shard_range(target, shard)
                param.data.narrow(0, offset, size).copy_(tensor)
                loaded.add((".".join(parts), shard))
            else:
                params[name].data.copy_(tensor)
                loaded.add((name, 0))
        # A tied lm_head is the embedding itself and is not listed twice in `params`.
        expected = sum(3 if "qkv_proj" in n else 2 if "gate_up" in n else 1 for n in params)
        if len(loaded) != expected:
            raise ValueError(f"checkpoint filled {len(loaded)} of {expected} weight shards")

    def _shard_range(self, target: str, shard: int) -> tuple[int, int]:
        args = self.args
        if target == "gate_up_proj":
            return shard * args.intermediate_size, args.intermediate_size
        q_size, kv_size = args.num_heads * args.head_dim, args.num_kv_heads * args.head_dim
        return [(0, q_size), (q_size, kv_size), (q_size + kv_size, kv_size)][shard]
