"""Reading exported checkpoints back: dequantized weights and a fake-quantized model.

The inverse of ModelOpt's unified HF export for the registry's formats:
* FP8: ``weight (e4m3) * weight_scale``.
* NVFP4: two E2M1 codes per byte (low nibble first, bit 3 = sign) times the FP8-E4M3 block
  scale (one per 16 values) times the FP32 ``weight_scale_2``.
* W4A8 / INT4_AWQ: two signed INT4 codes per byte packed along the output dimension (row 2r in
  the low nibble, 2r+1 in the high one) times the per-group-of-128 ``weight_scale``. W4A8 then
  rounds the result onto the per-tensor FP8 grid ``weight_scale_2``, as its FP8 GEMM does.

``load_fake_quant_model`` rebuilds a model whose quantized linears run dequantized weights and
fake-quantized activations (``input_scale`` gives the static amax): what a runtime computes,
in plain PyTorch, on any device.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from torch import nn

from autoq import fakequant
from autoq.errors import AutoqError
from autoq.formats import FORMATS, Format
from autoq.verify import read_headers, read_quant_config

E2M1_VALUES = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0])
# input_scale = amax / (largest code of the activation grid): FP8 448, NVFP4 6 * 448.
_ACTIVATION_SCALE_TO_AMAX = {"fp8": fakequant.FP8_E4M3_MAX, "nvfp4": fakequant.FP4_E2M1_MAX * fakequant.FP8_E4M3_MAX}


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """``(out/2, in)`` uint8 -> ``(out, in)`` int8 codes in [-8, 7]."""
    low = (packed & 0x0F).to(torch.int8)
    high = (packed >> 4).to(torch.int8)
    codes = torch.stack([low, high], dim=1).reshape(packed.shape[0] * 2, packed.shape[1])
    return torch.where(codes > 7, codes - 16, codes)


def unpack_nvfp4(packed: torch.Tensor) -> torch.Tensor:
    """``(out, in/2)`` uint8 -> ``(out, in)`` float32 E2M1 values."""
    codes = torch.stack([packed & 0x0F, packed >> 4], dim=-1).reshape(packed.shape[0], packed.shape[1] * 2)
    return E2M1_VALUES.to(packed.device)[codes.long()]


def dequantize_weight(fmt: Format, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    """Float32 weight of one layer from its stored tensors (keyed by suffix: weight, weight_scale, ...)."""
    weight = tensors["weight"]
    if fmt.weight is None:
        return weight.float()
    if fmt.weight == "fp8":
        return weight.float() * tensors["weight_scale"].float()
    if fmt.weight == "nvfp4":
        block_scale = tensors["weight_scale"].float().repeat_interleave(fmt.weight_block, dim=1)
        return unpack_nvfp4(weight) * block_scale * tensors["weight_scale_2"].float()
    if fmt.weight == "int4":
        group_scale = tensors["weight_scale"].float().repeat_interleave(fmt.weight_block, dim=1)
        values = unpack_int4(weight).float() * group_scale
        if fmt.activation == "fp8":
            values = fakequant.fp8_e4m3(values, tensors["weight_scale_2"].float() * fakequant.FP8_E4M3_MAX)
        return values
    raise AssertionError(fmt.weight)


def read_layer_tensors(checkpoint: Path, name: str, headers=None) -> dict[str, torch.Tensor]:
    """All tensors ``<name>.<suffix>`` of one layer, read from whichever shard holds them."""
    headers = headers or read_headers(checkpoint)
    tensors = {}
    for key, info in headers.items():
        prefix, _, suffix = key.rpartition(".")
        if prefix == name:
            with safe_open(str(Path(checkpoint) / info.shard), framework="pt") as handle:
                tensors[suffix] = handle.get_tensor(key)
    return tensors


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


class FakeQuantLinear(nn.Module):
    """A linear layer computing as a runtime would from a quantized checkpoint layer."""

    def __init__(self, fmt: Format, tensors: dict[str, torch.Tensor], bias: torch.Tensor | None, dtype: torch.dtype):
        super().__init__()
        self.fmt = fmt
        weight = dequantize_weight(fmt, tensors)
        self.out_features, self.in_features = weight.shape
        self.weight = nn.Parameter(weight.to(dtype), requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias.to(dtype), requires_grad=False)
        pre_quant_scale = tensors.get("pre_quant_scale")
        self.register_buffer("pre_quant_scale", None if pre_quant_scale is None else pre_quant_scale.to(dtype))
        amax = None
        if fmt.activation is not None:
            amax = tensors["input_scale"].float().reshape(1) * _ACTIVATION_SCALE_TO_AMAX[fmt.activation]
        self.register_buffer("input_amax", amax)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pre_quant_scale is not None:
            x = x * self.pre_quant_scale
        if self.input_amax is not None:
            x = self.fmt.quantize_input(x, self.input_amax)
        return F.linear(x, self.weight, self.bias)


def load_fake_quant_model(checkpoint: Path, device: str | torch.device = "cpu") -> nn.Module:
    """The checkpoint's model with every quantized linear replaced by a ``FakeQuantLinear``."""
    from transformers import AutoConfig, AutoModelForCausalLM

    checkpoint = Path(checkpoint)
    formats = checkpoint_formats(checkpoint)
    config = AutoConfig.from_pretrained(checkpoint)
    config.quantization_config = None  # the weights we load are dequantized ourselves
    dtype = getattr(config, "torch_dtype", None) or torch.bfloat16
    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    from transformers.initialization import no_init_weights

    with no_init_weights():  # every weight is overwritten below; buffers (rotary) are built normally
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    headers = read_headers(checkpoint)
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
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if k.rpartition(".")[0] not in formats and not _tied(model, k)]
    if missing or unexpected:
        raise AutoqError(f"{checkpoint}: tensors missing {missing[:3]} / unexpected {unexpected[:3]}")
    model.tie_weights()
    return model.to(device).eval().requires_grad_(False)


def _tied(model: nn.Module, key: str) -> bool:
    return key.endswith("lm_head.weight") and bool(getattr(model.config, "tie_word_embeddings", False))
