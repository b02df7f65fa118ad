"""qwen25: a from-scratch implementation of the Qwen2.5 model family."""
