"""pyllm: a small, fast, honest LLM inference engine for Llama-family models."""

from .engine import LLM, Output
from .errors import PyllmError
from .sampling import SamplingParams

__all__ = ["LLM", "Output", "PyllmError", "SamplingParams"]
