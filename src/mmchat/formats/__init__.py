"""Checkpoint I/O: GGUF files and HuggingFace folders in, our tensor names and a ModelConfig out."""
