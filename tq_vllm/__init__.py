"""tq_vllm: a TurboQuant-compressed KV cache for unmodified vLLM."""
__version__ = "0.1.0"
