"""Analytic step times from the hardware's peaks and the model's shapes, for machines we cannot
measure (`iterserve simulate --hardware h100 --model llama-3-8b --tensor-parallel-size 2`).

A step reads every weight once and every context token's K and V once, and does two FLOPs
per weight per token computed; it takes the longer of the two at the achievable fractions
of peak, plus a fixed overhead per step (the host's work and launches). Between the
linears of one layer, tensor parallelism adds two all-reduces of the step's activations.
Attention FLOPs are left out: under a tenth of the linears' below 4k tokens of context.
"""

from dataclasses import dataclass
import json
from pathlib import Path

from scheduler.cost_model import StepShape


@dataclass(frozen=True, slots=True)
class Hardware:
    name: str
    peak_flops: float  # dense bf16 matmul, per device
    memory_bandwidth: float  # bytes/s, per device
    memory_bytes: float
    interconnect_bandwidth: float = 0.0  # bytes/s per device for all-reduce (NVLink), 0 on one device


# Vendor datasheets (SXM parts). GPU.md measured ~790 TFLOP/s and ~3.0 TB/s on an H100:
# the efficiencies below are those ratios.
HARDWARE = {
    "h100": Hardware("NVIDIA H100 SXM", 989e12, 3.35e12, 80e9, 450e9),
    "h200": Hardware("NVIDIA H200 SXM", 989e12, 4.8e12, 141e9, 450e9),
    "a100": Hardware("NVIDIA A100 SXM 80GB", 312e12, 2.04e12, 80e9, 300e9),
}


def hardware_preset(device_name: str) -> str:
    """The preset for a CUDA device's name ("NVIDIA H200", "NVIDIA A100-SXM4-80GB"); H100 for
    any other, the device these presets were checked against (BENCHMARKS.md)."""
    name = device_name.upper()
    return next((preset for preset in HARDWARE if preset.upper() in name), "h100")


@dataclass(frozen=True, slots=True)
class ModelShape:
    name: str
    num_params: float
    num_layers: int
    hidden_size: int
    num_kv_heads: int
    head_dim: int
    bytes_per_value: int = 2  # bf16 weights, and KV unless kv_bytes_per_value says otherwise
    kv_bytes_per_value: int | None = None  # --kv-cache-dtype (KV_CACHE_BYTES); None: bytes_per_value

    @property
    def kv_bytes_per_token(self) -> int:
        per_value = self.kv_bytes_per_value or self.bytes_per_value
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * per_value

    @classmethod
    def from_hf_config(cls, path: str | Path) -> "ModelShape":
        """A Llama-family Hugging Face folder's config.json (the parameter count from its shapes)."""
        config = json.loads((Path(path) / "config.json").read_text())
        hidden, layers = config["hidden_size"], config["num_hidden_layers"]
        heads = config["num_attention_heads"]
        kv_heads = config.get("num_key_value_heads", heads)
        head_dim = config.get("head_dim", hidden // heads)
        mlp, vocab = config["intermediate_size"], config["vocab_size"]
        per_layer = hidden * head_dim * (heads + 2 * kv_heads) + heads * head_dim * hidden + 3 * hidden * mlp
        embeddings = vocab * hidden * (1 if config.get("tie_word_embeddings") else 2)
        return cls(Path(path).name, layers * per_layer + embeddings, layers, hidden, kv_heads, head_dim)


# Bytes per value of each --kv-cache-dtype but auto (the model's own).
KV_CACHE_BYTES = {"bfloat16": 2, "float16": 2, "fp8_e5m2": 1}

MODELS = {
    "smollm2-135m": ModelShape("SmolLM2-135M", 134.5e6, 30, 576, 3, 64),
    "llama-3-8b": ModelShape("Llama-3-8B", 8.03e9, 32, 4096, 8, 128),
    "llama-3-70b": ModelShape("Llama-3-70B", 70.6e9, 80, 8192, 8, 128),
}


@dataclass(frozen=True, slots=True)
class RooflineStepTime:
    hardware: Hardware
    model: ModelShape
    tensor_parallel_size: int = 1
    flops_efficiency: float = 0.8  # of peak: GPU.md's 790 of 989 TFLOP/s
    bandwidth_efficiency: float = 0.9  # of peak: GPU.md's 3.0 of 3.35 TB/s
    step_overhead_s: float = 0.002  # host work per step of an engine that overlaps little (vLLM v1: ~1-3 ms)
    all_reduce_latency_s: float = 10e-6

    def __call__(self, shape: StepShape) -> float:
        tp = self.tensor_parallel_size
        model = self.model
        tokens = shape.prefill_tokens + shape.decode_seqs
        compute_s = 2 * model.num_params * tokens / (tp * self.hardware.peak_flops * self.flops_efficiency)
        moved = model.num_params * model.bytes_per_value + model.kv_bytes_per_token * shape.context_tokens
        memory_s = moved / (tp * self.hardware.memory_bandwidth * self.bandwidth_efficiency)
        step_s = self.step_overhead_s + max(compute_s, memory_s)
        if tp > 1:
            # A ring all-reduce moves 2 (tp - 1) / tp of the activations, twice per layer.
            activation_bytes = tokens * model.hidden_size * model.bytes_per_value
            per_reduce = (self.all_reduce_latency_s
                          + 2 * (tp - 1) / tp * activation_bytes / self.hardware.interconnect_bandwidth)
            step_s += 2 * model.num_layers * per_reduce
        return step_s

    def kv_cache_bytes(self, memory_fraction: float = 0.9) -> float:
        """What is left for the KV cache across the devices, after the weights (vLLM's
        --gpu-memory-utilization 0.9, less a little for activations)."""
        tp = self.tensor_parallel_size
        weights = self.model.num_params * self.model.bytes_per_value
        return max(0.0, tp * self.hardware.memory_bytes * memory_fraction - weights) * 0.95
