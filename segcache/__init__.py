"""segcache: an LLM inference server with a segment-tree KV cache for multi-agent workloads."""

__version__ = "0.1.0"
