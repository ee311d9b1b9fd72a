"""Streaming inference: chunk-wise autoregressive generation with a bounded KV cache."""
