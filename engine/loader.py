"""Finds and loads a model folder: config, tokenizer, safetensors weights into our model."""

from dataclasses import dataclass
import json
from pathlib import Path

import torch

from engine import host
from engine import cpu_kernels
from engine.model import KernelLayerOps, LlamaForCausalLM, ModelArgs, pack_linears_for_cpu, use_layer_ops

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(slots=True)
class LoadedModel:
    path: Path
    model: LlamaForCausalLM
    tokenizer: object
    eos_token_ids: frozenset[int]
    max_model_len: int


def resolve_model_path(model: str | None) -> Path:
    if model is None:
        from engine.embedded_model import default_model_path
        return default_model_path()
    path = Path(model).expanduser()
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"{path} is not a model folder (no config.json); weights are never downloaded")
    return path


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if host.current().cuda else "cpu")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        # bfloat16 where the hardware computes it natively: about 2x float32's throughput
        # on an AVX512-BF16 CPU (BENCHMARKS.md); on other CPUs it is emulated, several times
        # slower than float32. CUDA GPUs before Ampere have no bfloat16: float16 there.
        machine = host.current()
        if device.type == "cuda":
            return torch.bfloat16 if machine.cuda is None or machine.cuda.supports_bfloat16 else torch.float16
        return torch.bfloat16 if machine.cpu.native_bfloat16 else torch.float32
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be auto or one of {sorted(DTYPES)}, got {dtype!r}")
    return DTYPES[dtype]


KV_CACHE_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "fp8_e5m2": torch.float8_e5m2}


def resolve_kv_cache_dtype(kv_cache_dtype: str, model_dtype: torch.dtype) -> torch.dtype:
    """The KV cache's element type (vLLM's --kv-cache-dtype): `auto` is the model's. A narrower
    one holds more tokens in the same memory and gives attention fewer bytes to read: a float32
    model may keep its keys and values in bfloat16 or float16 (half), any model in float8 e5m2
    (the top byte of a float16, so no scale is needed: vLLM's CPU fp8). A 16-bit model's cache
    takes no other 16-bit format: converting between the two loses bits and saves nothing."""
    if kv_cache_dtype == "auto":
        return model_dtype
    if kv_cache_dtype not in KV_CACHE_DTYPES:
        raise ValueError(f"kv_cache_dtype must be auto or one of {list(KV_CACHE_DTYPES)}, got {kv_cache_dtype!r}")
    cache_dtype = KV_CACHE_DTYPES[kv_cache_dtype]
    if cache_dtype.itemsize == 2 and model_dtype not in (cache_dtype, torch.float32):
        raise ValueError(f"a {kv_cache_dtype} KV cache needs a float32 or {kv_cache_dtype} model; this one is "
                         f"{str(model_dtype).removeprefix('torch.')}: use --kv-cache-dtype auto")
    return cache_dtype


def kv_cache_dtype_name(dtype: torch.dtype) -> str:
    """A cache dtype as --kv-cache-dtype spells it (torch's name for the model dtypes it has no word for)."""
    return next((name for name, known in KV_CACHE_DTYPES.items() if known == dtype), str(dtype).removeprefix("torch."))


def linear_path(dtype: torch.dtype, device: torch.device) -> str:
    """How the model's Linear layers run: "onednn-packed" (PackedLinear) or "F.linear"."""
    cpu = host.current().cpu
    if device.type == "cpu" and ((dtype == torch.bfloat16 and cpu.onednn_packs_bfloat16)
                                 or (dtype == torch.float32 and cpu.onednn_packs_float32)):
        return "onednn-packed"
    return "F.linear"


def load_model(path: Path, dtype: torch.dtype, device: torch.device, max_model_len: int | None) -> LoadedModel:
    from safetensors import safe_open
    from transformers import AutoConfig, AutoTokenizer

    config = AutoConfig.from_pretrained(path)
    args = ModelArgs.from_hf_config(config)
    limit = args.max_position_embeddings
    if max_model_len is None:
        max_model_len = limit
    elif max_model_len > limit:
        raise ValueError(f"max_model_len {max_model_len} exceeds the model's {limit} positions")

    # Built on the meta device, so no time goes into random initialisation we overwrite.
    with torch.device("meta"):
        model = LlamaForCausalLM(args, max_model_len, device)
    model = model.to_empty(device=device).to(dtype)
    if args.tie_word_embeddings:
        model.lm_head.weight = model.embed_tokens.weight

    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no .safetensors files in {path}")

    def weights():
        for file in files:
            with safe_open(str(file), framework="pt") as handle:
                for name in handle.keys():
                    yield name, handle.get_tensor(name)

    model.load_weights(weights())
    model.eval()
    if linear_path(dtype, device) == "onednn-packed":
        pack_linears_for_cpu(model)
    kernels = cpu_kernels.load() if device.type == "cpu" else None
    if kernels is not None:
        use_layer_ops(model, KernelLayerOps(kernels))
    tokenizer = AutoTokenizer.from_pretrained(path)
    return LoadedModel(path, model, tokenizer, _eos_token_ids(path, config, tokenizer), max_model_len)


def _eos_token_ids(path: Path, config, tokenizer) -> frozenset[int]:
    ids: set[int] = set()
    sources = [getattr(config, "eos_token_id", None), tokenizer.eos_token_id]
    generation_config = path / "generation_config.json"
    if generation_config.exists():
        sources.append(json.loads(generation_config.read_text()).get("eos_token_id"))
    for value in sources:
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, list):
            ids.update(v for v in value if isinstance(v, int))
    return frozenset(ids)
