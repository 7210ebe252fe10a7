"""Test support: a fake llama-server, tiny real GGUF models, the llama-server build, and
process-leak detection. Nothing here is imported by swapd itself."""
