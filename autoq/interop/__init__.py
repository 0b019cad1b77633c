"""Plans to and from other quantization tools (ModelOpt, llm-compressor, AMD Quark, vLLM)."""
