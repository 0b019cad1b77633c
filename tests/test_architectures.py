"""Block-wise scoring on the decoder architectures transformers ships, from each one's own config class.

Every model here is a tiny random float32 model (float32 so that "equal" can mean equal to float
rounding: in bf16 the block-wise and full-model forwards would agree only to bf16 precision).
"""

from __future__ import annotations

import pandas as pd
import pytest
import torch
from reference_scores import reference_scores
from transformers import AutoConfig, AutoModelForCausalLM

from autoq.decoder import DecoderStructure
from autoq.errors import AutoqError
from autoq.plan import Plan, plan_from_solution
from autoq.search_space import linear_shape, load_search_space, parse_search_space, select_layers
from autoq.sensitivity import ScoringOptions, SensitivityEngine
from autoq.solver import Options, assign_groups, solve

VOCAB = 256
SMALL = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             vocab_size=VOCAB, max_position_embeddings=512, pad_token_id=0, bos_token_id=1, eos_token_id=2)  # fmt: skip
FORMATS = ["FP8", "NVFP4"]
# Block-wise logits against the full forward (float32): max |difference| / max |logit|.
LOGITS_TOLERANCE = 1e-5
# Engine scores against the full-model reference (float32): relative difference per (layer, format).
SCORE_TOLERANCE = 1e-4


def tiny_model(model_type: str, seed: int = 0, **config) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **{**SMALL, **config}), dtype=torch.float32)
    return model.eval().requires_grad_(False)


def token_batches(count: int, rows: int, seq_len: int, seed: int = 0) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(3, VOCAB, (rows, seq_len), generator=generator) for _ in range(count)]


def engine_table(model: torch.nn.Module, batches: list[torch.Tensor], lm_head: bool = True, **options) -> tuple[pd.DataFrame, list]:
    """Every linear but what the built-in spaces skip (routers, gates, vision towers), and the lm_head."""
    skip = ", ".join(f"'{pattern}'" for pattern in load_search_space("default").skip)
    space = parse_search_space(
        f"formats: [{', '.join(FORMATS)}, BF16]\nsearch_lm_head: {str(lm_head).lower()}\nskip: [{skip}]", "test"
    )
    choices = select_layers(model, space, DecoderStructure(model).lm_head_name)
    options = ScoringOptions(batch_size=len(batches[0]), progress=False, tokens_per_step=1, **options)
    return SensitivityEngine(model, choices, options).run(batches), choices


def assert_scores_match_reference(model: torch.nn.Module, batches: list[torch.Tensor], **options) -> pd.DataFrame:
    """Engine scores (every searched linear and the lm_head) equal the plain full-model reference."""
    table, choices = engine_table(model, batches, **options)
    ours = table.set_index(["layer", "format"]).score
    reference = reference_scores(model, [c.name for c in choices], batches, FORMATS)
    assert (reference > 0).all()
    compared = ours.loc[reference.index]
    relative = (compared - reference).abs() / reference
    assert relative.max() <= SCORE_TOLERANCE, relative.sort_values().tail()
    return table


def make_plan(table: pd.DataFrame, budget: float) -> Plan:
    space = parse_search_space("formats: [FP8, NVFP4, BF16]", "test")
    grouped = assign_groups(table, space)
    solution = solve(Options.from_table(grouped), budget)
    return plan_from_solution(grouped, solution.choice, budget_bits=budget, total_params=int(grouped.drop_duplicates("layer").params.sum()))


def blockwise_error(structure: DecoderStructure, ids: torch.Tensor, calls: list) -> float:
    """Max |logit difference| / max |logit| of replaying ``calls`` block by block against the full forward."""
    with torch.no_grad():
        reference = structure.model(input_ids=ids, use_cache=False).logits[0]
        hidden, _ = structure.embed(ids)
        for index in range(len(structure.layers)):
            hidden = structure.run_block(index, hidden, calls)
        logits = structure.logits(structure.final_hidden(hidden, ids)[0])
    return ((logits - reference).abs().max() / reference.abs().max()).item()


def test_qwen2_sliding_window_shorter_than_calibration() -> None:
    """The review's probe: layer 0 slides over 100 tokens, layer 1 attends to all 256. Each block
    must get its own mask: block 0's arguments replayed for both (what a rebuilt or shared set
    of arguments does) is far off at 256 tokens, the captured ones are exact, and the scores
    equal the full-model reference."""
    model = tiny_model("qwen2", use_sliding_window=True, sliding_window=100, max_window_layers=1,
                       layer_types=["sliding_attention", "full_attention"])  # fmt: skip
    batches = token_batches(3, 2, 256)
    structure = DecoderStructure(model)
    ids = batches[0][:1]
    _, calls = structure.embed(ids)
    assert calls[0].kwargs["attention_mask"] is not calls[1].kwargs["attention_mask"]
    assert blockwise_error(structure, ids, calls) <= LOGITS_TOLERANCE
    assert blockwise_error(structure, ids, [calls[0]] * len(calls)) > 0.05
    assert_scores_match_reference(model, batches)


def test_equal_block_arguments_are_stored_once() -> None:
    """A model that builds an equal mask for each of its blocks: the captured arguments keep one copy."""
    model = tiny_model("llama", num_hidden_layers=4, attn_implementation="eager")
    for block in model.model.layers:  # each block now receives its own copy of the mask
        block.register_forward_pre_hook(
            lambda m, args, kwargs: (args, {**kwargs, "attention_mask": kwargs["attention_mask"].clone()}), with_kwargs=True
        )
    _, calls = DecoderStructure(model).embed(token_batches(1, 2, 32)[0])
    masks = [call.kwargs["attention_mask"] for call in calls]
    assert masks[0] is not None and all(mask is masks[0] for mask in masks)
    assert all(call.kwargs["position_embeddings"][0] is calls[0].kwargs["position_embeddings"][0] for call in calls)


def test_blocks_called_out_of_order_are_refused() -> None:
    model = tiny_model("llama", num_hidden_layers=3)
    layers = model.model.layers
    model.model.layers = torch.nn.ModuleList([layers[0], layers[2], layers[1]])
    structure = DecoderStructure(model)
    structure.layers = layers  # the list autoq found, called by the model in another order
    with pytest.raises(AutoqError, match="out of order"):
        structure.embed(token_batches(1, 1, 8)[0])


# Each architecture from its own config class, with the features that make its blocks or head
# differ: sliding windows shorter than the sequence, per-layer-type masks and RoPE, soft-capped
# logits, fused projections, transposed (Conv1D) linears, scaled logits and embeddings.
DENSE = {
    "llama": {},
    "mistral": dict(sliding_window=16),
    "qwen2": dict(use_sliding_window=True, sliding_window=16, max_window_layers=1, layer_types=["sliding_attention", "full_attention"]),
    "qwen3": dict(head_dim=16),
    "gemma2": dict(head_dim=16, sliding_window=16, final_logit_softcapping=0.3),
    "gemma3_text": dict(head_dim=16, sliding_window=16, layer_types=["sliding_attention", "full_attention"], final_logit_softcapping=0.3),
    "phi3": {},
    "olmo2": {},
    "gpt_neox": {},
    "gpt2": dict(n_embd=64, n_layer=2, n_head=4),
    "granite": dict(logits_scaling=4.0, embedding_multiplier=3.0, residual_multiplier=0.5),
}  # fmt: skip


@pytest.mark.parametrize("model_type", DENSE)
def test_dense_architecture(model_type: str) -> None:
    """Block-wise logits equal the full forward; scores (lm_head included) equal the full-model
    reference; a plan comes out, with every searched layer in it."""
    model = tiny_model(model_type, **DENSE[model_type])
    batches = token_batches(2, 2, 48)
    structure = DecoderStructure(model)
    ids = batches[0][:1]
    assert blockwise_error(structure, ids, structure.embed(ids)[1]) <= LOGITS_TOLERANCE
    table = assert_scores_match_reference(model, batches)
    assert table.layer.nunique() == sum(linear_shape(m) is not None for m in model.modules())  # Conv1D too
    plan = make_plan(table, budget=7.0)
    assert set(plan.layers) == set(table.layer) and plan.achieved["searched_effective_bits"] <= 7.0


@pytest.mark.parametrize(("model_type", "config"), [
    ("gemma2", dict(head_dim=16, final_logit_softcapping=0.3)),  # soft-capped logits, sqrt(d) embedding scale, tied
    ("granite", dict(logits_scaling=4.0, embedding_multiplier=3.0)),  # logits divided by a scale
])  # fmt: skip
def test_heads_are_the_models_own_code(model_type: str, config: dict) -> None:
    """These heads are more than ``lm_head(norm(h))``: the block-wise logits still equal the model's."""
    model = tiny_model(model_type, **config)
    structure = DecoderStructure(model)
    ids = token_batches(1, 1, 32)[0]
    with torch.no_grad():
        reference = model(input_ids=ids).logits[0]
        hidden, calls = structure.embed(ids)
        for index in range(len(structure.layers)):
            hidden = structure.run_block(index, hidden, calls)
        naive = structure.lm_head(structure.decoder.norm(hidden))[0]
        ours = structure.logits(structure.final_hidden(hidden, ids)[0])
    assert (naive - reference).abs().max() > 0.1 * reference.abs().max()
    assert (ours - reference).abs().max() <= LOGITS_TOLERANCE * reference.abs().max()


MOE = {
    "mixtral": dict(num_local_experts=4, num_experts_per_tok=2, sliding_window=None),
    "qwen2_moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=64, shared_expert_intermediate_size=64),
    "qwen3_moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=64, head_dim=16),
}


@pytest.mark.parametrize("model_type", MOE)
def test_moe_fused_experts(model_type: str) -> None:
    """transformers 5 keeps each layer's experts in two 3-D parameters. Each is searched as one
    layer scored with every expert's real routed tokens (equal to the full-model reference), its
    bits count every expert as exported, both projections of a layer form one group, and the
    router stays unquantized."""
    model = tiny_model(model_type, **MOE[model_type])
    batches = token_batches(2, 2, 48)
    structure = DecoderStructure(model)
    ids = batches[0][:1]
    assert blockwise_error(structure, ids, structure.embed(ids)[1]) <= LOGITS_TOLERANCE
    table = assert_scores_match_reference(model, batches)

    experts = model.model.layers[0].mlp.experts
    count, inter2, hidden = experts.gate_up_proj.shape
    gate_up = table.set_index(["layer", "format"]).loc["model.layers.0.mlp.experts.gate_up_proj"]
    assert gate_up.params.iloc[0] == count * inter2 * hidden
    # exported as gate_proj and up_proj per expert, each with its own weight and input scales
    assert gate_up.loc["FP8", "bits"] == count * 2 * (inter2 // 2 * hidden * 8 + 32 + 32)
    assert set(table.format[table.layer.str.contains("experts")]) == {"FP8", "NVFP4", "BF16"}

    default = load_search_space("default")
    searched = {c.name for c in select_layers(model, default, "lm_head")}
    assert "model.layers.1.mlp.experts.down_proj" in searched
    assert not any("gate" in name.rsplit(".", 1)[-1] and "proj" not in name for name in searched)  # no router
    assert all(c.candidates == ("NVFP4", "FP8", "BF16") for c in select_layers(model, default, "lm_head") if c.experts > 1)
    grouped = assign_groups(table, default)
    groups = grouped.drop_duplicates("layer").set_index("layer").group
    assert groups["model.layers.0.mlp.experts.gate_up_proj"] == groups["model.layers.0.mlp.experts.down_proj"]
    plan = make_plan(table, budget=7.0)
    assert plan.layers["model.layers.0.mlp.experts.down_proj"].format in ("FP8", "NVFP4", "BF16")


def vision_language_model(model_type: str, **shape) -> torch.nn.Module:
    """Gemma 3 (which autoq loads through AutoModelForCausalLM) or Qwen2-VL (mrope positions),
    a tiny vision tower in front of the language model."""
    torch.manual_seed(0)
    text = {**SMALL, "vocab_size": VOCAB + 8, **shape}
    if model_type == "gemma3":
        config = AutoConfig.for_model(
            "gemma3", text_config={**text, "head_dim": 16, "sliding_window": 16, "layer_types": ["sliding_attention", "full_attention"]},
            vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=32, patch_size=8),
            mm_tokens_per_image=4, image_token_index=VOCAB + 7, boi_token_index=VOCAB + 5, eoi_token_index=VOCAB + 6,
        )  # fmt: skip
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    else:
        from transformers import Qwen2VLForConditionalGeneration

        half_head = text["hidden_size"] // text["num_attention_heads"] // 2
        sections = [half_head // 4, 3 * half_head // 8, 3 * half_head // 8]
        config = AutoConfig.for_model(
            "qwen2_vl", text_config={**text, "rope_scaling": {"type": "mrope", "mrope_section": sections}},
            vision_config=dict(depth=1, embed_dim=32, hidden_size=64, num_heads=2, mlp_ratio=2),
            image_token_id=VOCAB + 7, video_token_id=VOCAB + 6, vision_start_token_id=VOCAB + 5,
        )  # fmt: skip
        model = Qwen2VLForConditionalGeneration(config)
    return model.eval().requires_grad_(False)


@pytest.mark.parametrize("model_type", ["gemma3", "qwen2_vl"])
def test_vision_language_model_searches_its_language_model(model_type: str) -> None:
    """The language model of a VLM is searched, on text; the default space skips the vision
    tower, and a space that selects it gets one clear error."""
    model = vision_language_model(model_type)
    batches = token_batches(2, 2, 48)
    structure = DecoderStructure(model)
    assert structure.layer_prefix == "model.language_model.layers"
    ids = batches[0][:1]
    assert blockwise_error(structure, ids, structure.embed(ids)[1]) <= LOGITS_TOLERANCE
    table = assert_scores_match_reference(model, batches)
    assert table.layer.str.startswith("model.language_model.layers.").sum() == len(table) - 3  # and the lm_head
    make_plan(table, budget=7.0)
    vision = [n for n, m in model.named_modules() if linear_shape(m) and ("visual" in n or "vision" in n)]
    assert vision and not set(vision) & {c.name for c in select_layers(model, load_search_space("default"), "lm_head")}
    everything = select_layers(model, parse_search_space("formats: [FP8]", "test"), "lm_head")
    with pytest.raises(AutoqError, match="outside the decoder blocks .* language decoder only"):
        SensitivityEngine(model, everything, ScoringOptions(progress=False))


# Wide enough for W4A8 (in_features a multiple of 128), in bf16 as exported checkpoints are.
EXPORT_SHAPE = dict(hidden_size=128, intermediate_size=256)
EXPORT_CASES = {
    **{t: {**c, **EXPORT_SHAPE} for t, c in DENSE.items() if t != "gpt2"},
    "gpt2": dict(n_embd=128, n_layer=2, n_head=4),
    **{t: {**c, **EXPORT_SHAPE, "moe_intermediate_size": 128} for t, c in MOE.items()},
    "gemma3": "vlm", "qwen2_vl": "vlm",
}  # fmt: skip


def tiny_tokenizer():
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"<unk>": 0}, unk_token="<unk>")), unk_token="<unk>")


@pytest.mark.parametrize("model_type", EXPORT_CASES)
def test_export_and_verify(model_type: str, tmp_path, capsys: pytest.CaptureFixture) -> None:
    """A mixed plan (block 0 FP8; block 1 W4A8 where the shape and layer allow it, else BF16) is
    applied and exported with ModelOpt, passes autoq's verification inside the export and
    ``autoq verify`` on the result; fused experts are stored per expert, at the plan's bits."""
    from autoq.apply import apply_plan, export_checkpoint
    from autoq.cli import main
    from autoq.plan import LayerPlan

    config = EXPORT_CASES[model_type]
    model = vision_language_model(model_type, **EXPORT_SHAPE) if config == "vlm" else tiny_model(model_type, **config)
    model = model.to(torch.bfloat16)
    model.config.architectures = [type(model).__name__]
    structure = DecoderStructure(model)
    space = parse_search_space(f"formats: [FP8, W4A8, BF16]\nskip: {list(load_search_space('default').skip)}", "test")
    choices = select_layers(model, space, structure.lm_head_name)
    formats = {}
    for c in choices:
        wanted = "FP8" if structure.block_index(c.name) == 0 else "W4A8"
        formats[c.name] = wanted if wanted in c.candidates else "BF16"
    apply_plan(model, formats, token_batches(2, 2, 32), progress=False)
    report = export_checkpoint(model, tiny_tokenizer(), Plan(layers={n: LayerPlan(format=f) for n, f in formats.items()}), tmp_path / "ckpt")
    assert main(["verify", str(tmp_path / "ckpt")]) == 0, capsys.readouterr()
    for c in choices:
        if c.experts > 1 and formats[c.name] == "FP8":  # every expert's linears, stored at the planned bits
            leaves = ("down_proj", "w2") if c.name.endswith("down_proj") else ("gate_proj", "up_proj", "w1", "w3")
            layer = c.name.split(".mlp.")[0] + "."
            stored = [n for n in report.layer_bits if n.startswith(layer) and n.rsplit(".", 1)[1] in leaves and ".experts." in n]
            assert len(stored) == c.experts * c.parts
            assert sum(report.layer_bits[n] for n in stored) == c.storage_bits("FP8")
