"""Checkpoint and tokenizer loading: HF folders (safetensors) and GGUF files."""
