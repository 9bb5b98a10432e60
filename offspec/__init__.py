"""offspec: run LLMs larger than memory with layer streaming and large-tree speculative decoding."""

__version__ = "0.1.0"
