"""tq_vllm's vLLM attention backend (import `tq_vllm.attention.backend` for the classes; importing this package
does not import vLLM)."""
BACKEND_PATH = "tq_vllm.attention.backend.TQAttentionBackend"
