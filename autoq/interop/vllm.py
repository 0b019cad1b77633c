"""Can vLLM's ModelOpt loader serve a checkpoint? Checked from its config alone (no vLLM needed).

What vLLM reads, from ``vllm/model_executor/layers/quantization/modelopt.py`` (vllm-project/vllm,
read at commit 00155cdecca722d98e34234c3d172725b7720b7d):

* ``ModelOptQuantConfigBase.from_config``: ``quantization.quant_algo`` (upper-cased; must be in
  ``QUANT_ALGOS``), ``kv_cache_quant_algo`` (a string in ``KV_CACHE_QUANT_ALGOS`` or null),
  ``group_size`` (int), ``exclude_modules`` (a list of fnmatch wildcards).
* ``ModelOptMixedPrecisionConfig._from_config``: MIXED_PRECISION needs a non-empty
  ``quantized_layers`` mapping ``{module prefix: {"quant_algo": ..., "group_size": ...}}``; NVFP4
  group size defaults to 16.
* ``ModelOptMixedPrecisionConfig.get_quant_method``: a linear layer (``ParallelLMHead`` included)
  is served as FP8, NVFP4 or W4A16_NVFP4 at that commit; later vLLM adds MXFP8
  (``ModelOptMxFp8LinearMethod(self.mxfp8_config)``; at 00155cde an MXFP8 layer still falls
  through), so MXFP8 layers need a vLLM that has it. Any other per-layer ``quant_algo`` (W4A8_AWQ,
  W4A16_AWQ, W8A8_SQ_PER_CHANNEL) falls through to ``UnquantizedLinearMethod``, i.e. the packed
  weights would be read as if unquantized; TensorRT-LLM serves those.
* Per format, the tensors vLLM reads: FP8 ``weight``/``weight_scale``/``input_scale``; NVFP4 also
  ``weight_scale_2``; W4A16_NVFP4 ``weight``/``weight_scale``/``weight_scale_2`` (FP4 Marlin, no
  activation scale); MXFP8 ``weight`` (E4M3) and ``weight_scale`` (E8M0 as uint8), activations
  quantized on the fly (on Hopper, the Marlin fallback computes MXFP8 layers as W8A16).
* KV cache: ``ModelOptKVCacheMethod`` reads ``k_scale`` / ``v_scale`` for ``kv_cache_quant_algo``
  FP8 or NVFP4.
* Tied embeddings: with ``tie_word_embeddings`` vLLM's ``lm_head`` is the embedding's tensor, so
  a checkpoint can't serve a quantized head there (autoq never quantizes a tied head).
* ``_resolve_quant_algo``: the shards of a fused layer (``qkv_proj`` = q/k/v, ``gate_up_proj`` =
  gate/up) must share one ``quant_algo`` ("Mixed quant_algo within fused layer").
* ``override_quantization_method``: config.json's ``quantization_config.quant_method`` must start
  with ``modelopt``.
"""

from __future__ import annotations

from typing import Any

QUANT_ALGOS = {"FP8", "FP8_PER_CHANNEL_PER_TOKEN", "FP8_PB_WO", "NVFP4", "W4A16_NVFP4", "MXFP8", "MIXED_PRECISION"}
MIXED_LAYER_ALGOS = {"FP8", "NVFP4", "W4A16_NVFP4", "MXFP8"}
KV_CACHE_QUANT_ALGOS = {"FP8", "NVFP4"}
FUSED_SHARDS = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}


def vllm_problems(
    quantization: dict[str, Any], config_quantization: dict[str, Any] | None, tied_embeddings: bool = False
) -> list[str]:
    """Reasons vLLM would refuse or mis-load a checkpoint, given hf_quant_config.json's
    ``quantization`` section, config.json's ``quantization_config`` and its ``tie_word_embeddings``;
    empty when it can serve it."""
    problems = []
    algo = str(quantization.get("quant_algo") or "").upper()
    if algo not in QUANT_ALGOS:
        problems.append(f"quant_algo {algo or None!r} is not one vLLM's ModelOpt loader accepts ({sorted(QUANT_ALGOS)})")
    kv = quantization.get("kv_cache_quant_algo")
    if kv is not None and (not isinstance(kv, str) or kv.upper() not in KV_CACHE_QUANT_ALGOS):
        problems.append(f"kv_cache_quant_algo {kv!r} is not null, FP8 or NVFP4")
    if not isinstance(quantization.get("exclude_modules", []), list):
        problems.append("exclude_modules must be a list")
    if config_quantization is not None and not str(config_quantization.get("quant_method", "")).lower().startswith("modelopt"):
        problems.append("config.json quantization_config.quant_method does not start with 'modelopt'")
    if algo == "MIXED_PRECISION":
        layers = quantization.get("quantized_layers") or {}
        if not layers:
            problems.append("MIXED_PRECISION needs a non-empty quantized_layers mapping")
        for name, cfg in layers.items():
            layer_algo = str(cfg.get("quant_algo", "")).upper()
            if layer_algo not in MIXED_LAYER_ALGOS:
                problems.append(f"{name}: quant_algo {layer_algo} is not served by vLLM's MIXED_PRECISION loader "
                                f"({sorted(MIXED_LAYER_ALGOS)}); it would load as unquantized")  # fmt: skip
            if layer_algo in ("NVFP4", "W4A16_NVFP4") and int(cfg.get("group_size", 16)) != 16:
                problems.append(f"{name}: NVFP4 group_size must be 16")
        if tied_embeddings and "lm_head" in layers:
            problems.append("lm_head: quantized, but tie_word_embeddings makes vLLM's lm_head the unquantized embedding")
        for fused, shards in FUSED_SHARDS.items():
            prefixes = {name.rsplit(".", 1)[0] for name in layers if name.rsplit(".", 1)[-1] in shards}
            for prefix in sorted(prefixes):
                algos = {str(layers.get(f"{prefix}.{s}", {}).get("quant_algo", "unquantized")).upper() for s in shards}
                if len(algos) > 1:
                    problems.append(f"{prefix}.{fused}: shards use different quant_algo {sorted(algos)}")
    return problems
