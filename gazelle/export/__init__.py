"""Saving and export: merged checkpoints, GGUF files and Ollama Modelfiles."""
