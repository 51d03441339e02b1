"""llama.cpp through llama-cpp-python: GGUF k-quants, the engine most users pick on a CPU."""
