"""The decode path for Llama-family models: packed weights, a growing KV cache, fp32 attention."""
