"""A trained run out to other runtimes: fused Hugging Face folders, PEFT
adapters and GGUF files (llama.cpp, Ollama).
"""
