"""Reading exported checkpoints back: their layer formats and a fake-quantized model.

``load_fake_quant_model`` rebuilds a model whose quantized linears run the weights decoded from
the checkpoint (``autoq.codec``) and fake-quantized activations (``input_scale`` gives the static
amax; MXFP8 scales every input block dynamically), and whose attention layers, when the checkpoint
quantizes the KV cache, attend to fake-quantized keys and values (after RoPE, as ModelOpt's k/v
quantizers and a runtime's cache see them; ``k_scale`` / ``v_scale`` give their static amax):
what a runtime computes, in plain PyTorch, on any device.
"""

from __future__ import annotations

import inspect
import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from torch import nn

from autoq.codec import ACTIVATION_LARGEST_CODE, dequantize_weight, read_headers, read_layer_tensors
from autoq.errors import AutoqError
from autoq.formats import FORMATS, KV_CACHE_FORMATS, KV_CACHE_SCALE_TO_AMAX, Format, KVCacheFormat


def read_quant_config(checkpoint: Path) -> dict:
    """The ``quantization`` section of hf_quant_config.json (empty for an unquantized checkpoint)."""
    path = Path(checkpoint) / "hf_quant_config.json"
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text()).get("quantization", {})
    except json.JSONDecodeError as err:
        raise AutoqError(f"{path} is not valid JSON ({err.msg})") from None


def checkpoint_formats(checkpoint: Path) -> dict[str, str]:
    """Layer name -> registry format, from hf_quant_config.json (MIXED_PRECISION or uniform)."""
    from autoq.formats import format_for_hf_quant_algo

    quant = read_quant_config(checkpoint)
    if not quant or quant.get("quant_algo") is None:
        return {}
    if quant["quant_algo"] == "MIXED_PRECISION":
        return {name: format_for_hf_quant_algo(cfg["quant_algo"]).name for name, cfg in quant["quantized_layers"].items()}
    fmt = format_for_hf_quant_algo(quant["quant_algo"])
    headers = read_headers(checkpoint)
    return {key[: -len(".weight_scale")]: fmt.name for key in headers if key.endswith(".weight_scale")}


def unquantized_config(checkpoint: Path):
    """The checkpoint's model config without its quantization_config: transformers then builds
    plain modules (autoq reads the quantized tensors itself)."""
    from transformers import AutoConfig

    try:  # never the checkpoint's own code: exported checkpoints are read, not run
        config = AutoConfig.from_pretrained(checkpoint, trust_remote_code=False)
    except (OSError, ValueError) as err:
        raise AutoqError(f"cannot read {Path(checkpoint) / 'config.json'}: {err}") from None
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    return config


class FakeQuantLinear(nn.Module):
    """A linear layer computing as a runtime would from a quantized checkpoint layer."""

    def __init__(self, fmt: Format, tensors: dict[str, torch.Tensor], bias: torch.Tensor | None, dtype: torch.dtype):
        super().__init__()
        self.fmt = fmt
        weight = dequantize_weight(fmt, tensors, dtype)
        self.out_features, self.in_features = weight.shape
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias.to(dtype), requires_grad=False)
        pre_quant_scale = tensors.get("pre_quant_scale")
        self.register_buffer("pre_quant_scale", None if pre_quant_scale is None else pre_quant_scale.to(dtype))
        amax = None
        if fmt.static_activation:
            amax = tensors["input_scale"].float().reshape(1) * ACTIVATION_LARGEST_CODE[fmt.activation]
        self.register_buffer("input_amax", amax)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pre_quant_scale is not None:
            x = x * self.pre_quant_scale
        if self.fmt.activation is not None:
            x = self.fmt.quantize_input(x, self.input_amax)
        return F.linear(x, self.weight, self.bias)


def load_fake_quant_model(checkpoint: Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None) -> nn.Module:
    """The checkpoint's model with every quantized linear replaced by a ``FakeQuantLinear``.

    ``dtype``: what it computes in (default: the checkpoint's own). Compare a checkpoint with a
    reference model in the reference's dtype, so that the difference is the quantization's alone."""
    from transformers import AutoModelForCausalLM

    try:  # transformers 5
        from transformers.initialization import no_init_weights
    except ImportError:  # transformers 4.57
        from transformers.modeling_utils import no_init_weights

    from autoq.model import check_config_sizes, read_config

    checkpoint = Path(checkpoint)
    formats = checkpoint_formats(checkpoint)
    headers = read_headers(checkpoint)
    # Before building: a config whose sizes the tensors cannot back would allocate them all.
    check_config_sizes(read_config(checkpoint / "config.json"), checkpoint / "config.json", sum(math.prod(i.shape) for i in headers.values()))
    config = unquantized_config(checkpoint)  # the weights we load are dequantized ourselves
    if dtype is None:
        dtype = getattr(config, "torch_dtype", None) or torch.bfloat16
        dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    with no_init_weights():  # every weight is overwritten below; buffers (rotary) are built normally
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=False)
    quantized_keys = {f"{n}.{t.suffix}" for n, f in formats.items() for t in FORMATS[f].stored} | {f"{n}.bias" for n in formats}
    state = {}
    for shard in sorted({info.shard for info in headers.values()}):
        with safe_open(str(checkpoint / shard), framework="pt") as handle:
            state.update({k: handle.get_tensor(k) for k in handle.keys() if k not in quantized_keys})
    modules = dict(model.named_modules())
    for name, fmt_name in formats.items():
        if name not in modules:
            raise AutoqError(f"{checkpoint}: quantized layer {name} is not in the model")
        tensors = read_layer_tensors(checkpoint, name, headers)
        parent, _, child = name.rpartition(".")
        layer = FakeQuantLinear(FORMATS[fmt_name], tensors, tensors.get("bias"), dtype)
        setattr(modules[parent] if parent else model, child, layer)
    kv_scales = {k: state.pop(k) for k in list(state) if k.endswith((".k_proj.k_scale", ".v_proj.v_scale"))}
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if k.rpartition(".")[0] not in formats and not _tied(model, k)]
    if missing or unexpected:
        raise AutoqError(f"{checkpoint}: tensors missing {missing[:3]} / unexpected {unexpected[:3]}")
    model.tie_weights()
    kv_algo = read_quant_config(checkpoint).get("kv_cache_quant_algo")
    if kv_algo is not None:
        if kv_algo not in KV_CACHE_FORMATS:
            raise AutoqError(f"{checkpoint}: kv_cache_quant_algo {kv_algo!r} is not one autoq can run ({', '.join(KV_CACHE_FORMATS)})")
        quantize_kv_cache(model, KV_CACHE_FORMATS[kv_algo], kv_scales)
    return model.to(device).eval().requires_grad_(False)


_KV_ATTENTION = "autoq_kv_cache"


def _kv_quantized_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *args, **kwargs):
    """The model's own attention function on fake-quantized keys and values (``quantize_kv_cache``)."""
    kv = getattr(module, "autoq_kv_cache", None)
    if kv is not None:
        key, value = kv.quantize(key, module.autoq_k_amax), kv.quantize(value, module.autoq_v_amax)
    return _original_attention(module)(module, query, key, value, *args, **kwargs)


def _original_attention(module: nn.Module):
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    implementation = module.autoq_attention
    if implementation == "eager":  # each model's own module defines it
        return inspect.getmodule(type(module)).eager_attention_forward
    return ALL_ATTENTION_FUNCTIONS[implementation]


def quantize_kv_cache(model: nn.Module, kv_cache: KVCacheFormat, scales: dict[str, torch.Tensor]) -> None:
    """Make every attention layer with ``<attn>.k_proj.k_scale`` / ``v_proj.v_scale`` in ``scales``
    attend to keys and values fake-quantized as ``kv_cache`` (amax = scale * 448), through an attention
    implementation registered with transformers that wraps the model's own."""
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    implementation = model.config._attn_implementation
    name = f"{_KV_ATTENTION}_{implementation}"
    ALL_ATTENTION_FUNCTIONS.register(name, _kv_quantized_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(name, ALL_MASK_ATTENTION_FUNCTIONS[implementation])
    layers = {k.rsplit(".", 2)[0] for k in scales}
    modules = dict(model.named_modules())
    for layer in sorted(layers):
        k_scale, v_scale = scales.get(f"{layer}.k_proj.k_scale"), scales.get(f"{layer}.v_proj.v_scale")
        if layer not in modules or k_scale is None or v_scale is None:
            raise AutoqError(f"KV-cache scales of {layer} do not match an attention layer with both k_scale and v_scale")
        attention = modules[layer]
        attention.autoq_kv_cache, attention.autoq_attention = kv_cache, implementation
        attention.register_buffer("autoq_k_amax", k_scale.float().reshape(()) * KV_CACHE_SCALE_TO_AMAX)
        attention.register_buffer("autoq_v_amax", v_scale.float().reshape(()) * KV_CACHE_SCALE_TO_AMAX)
    model.config._attn_implementation = name  # the setter passes it on to sub-configs


def _tied(model: nn.Module, key: str) -> bool:
    return key.endswith("lm_head.weight") and bool(getattr(model.config, "tie_word_embeddings", False))
