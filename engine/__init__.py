"""Tensors and the model: loading, the paged-attention model code, sampling, the engine loop.

Owns the KV tensor, the model weights and every torch call; takes its plan for each
step from `scheduler/` and reports sampled tokens back. Knows nothing of HTTP.
"""

from engine.config import EngineConfig
from engine.llm import LLM
from engine.llm_engine import LLMEngine
from engine.outputs import Completion, RequestOutput

__all__ = ["Completion", "EngineConfig", "LLM", "LLMEngine", "RequestOutput"]
