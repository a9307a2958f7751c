"""Quality evaluation: perplexity under decode semantics, needle-in-a-haystack, baselines (bf16, fp8, vLLM recipes)."""
