"""The sensitivity engine: it computes the definition, agrees with ModelOpt, and is frugal."""

from __future__ import annotations

import copy
from pathlib import Path

import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from autoq.cache import ScoreCache
from autoq.data import load_tokens
from autoq.decoder import DecoderStructure, shared_input_readers
from autoq.formats import FORMATS, Format
from autoq.model import ModelSource, load_model, load_tokenizer
from autoq.search_space import parse_search_space, select_layers
from autoq.sensitivity import ScoringOptions, SensitivityEngine

SAMPLES, SEQ_LEN, BATCH = 8, 64, 4


def _space(formats: str, lm_head: bool = False):
    return parse_search_space(f"formats: [{formats}]\nsearch_lm_head: {str(lm_head).lower()}", "test")


def _setup(model_dir: Path, formats: str = "NVFP4, FP8, W4A8, BF16", lm_head: bool = False, samples: int = SAMPLES, batch: int = BATCH):
    source = ModelSource(model_dir, model_dir.name)
    model = load_model(source)
    tokens = load_tokens("default", load_tokenizer(source), samples, SEQ_LEN)
    choices = select_layers(model, _space(formats, lm_head), DecoderStructure(model).lm_head_name)
    return model, choices, tokens.batches(batch)


def _scores(model, choices, batches, cache: ScoreCache | None = None, batch: int = BATCH, **options) -> pd.Series:
    engine = SensitivityEngine(model, choices, ScoringOptions(batch_size=batch, progress=False, **options), cache)
    return engine.run(batches).set_index(["layer", "format"]).score


def test_engine_computes_the_definition(tiny_llama: Path) -> None:
    """Block-wise recompute == one plain full-model backward with the score taken at each output.

    Layers reading one input share their per-tensor weight amax (the group maximum), as
    ModelOpt's export stores them.
    """
    model, choices, batches = _setup(tiny_llama, "NVFP4, FP8, BF16", lm_head=True)
    ours = _scores(model, choices, batches)

    modules = dict(model.named_modules())
    names = [c.name for c in choices]
    amax = {n: torch.zeros(modules[n].in_features) for n in names}
    hooks = [modules[n].register_forward_pre_hook(
        lambda m, a, n=n: amax.__setitem__(n, torch.maximum(amax[n], a[0].reshape(-1, a[0].shape[-1]).abs().amax(0).float())))
        for n in names]  # fmt: skip
    with torch.no_grad():
        for ids in batches:
            model(input_ids=ids)
    for h in hooks:
        h.remove()

    readers = shared_input_readers(model, names, batches[0][:1])
    weight_amax = {n: max(modules[m].weight.abs().amax().float() for m in names if readers[m] == readers[n]) for n in names}
    assert weight_amax["model.layers.0.self_attn.k_proj"] == weight_amax["model.layers.0.self_attn.q_proj"]
    reference = {(n, f): 0.0 for n in names for f in ("NVFP4", "FP8")}
    model.get_input_embeddings().weight.requires_grad_(True)  # so activations carry gradients
    for ids in batches:
        seen = {}

        def keep(module, args, y, name):
            y.retain_grad()
            seen[name] = (args[0], y)

        hooks = [modules[n].register_forward_hook(lambda m, a, y, n=n: keep(m, a, y, n)) for n in names]
        model(input_ids=ids, labels=ids).loss.backward()
        for h in hooks:
            h.remove()
        with torch.no_grad():
            for n, (x, y) in seen.items():
                for f in ("NVFP4", "FP8"):
                    fmt = FORMATS[f]
                    qweight = fmt.quantize_weight(modules[n].weight, tensor_amax=weight_amax[n])
                    diff = F.linear(fmt.quantize_input(x, amax[n]), qweight, modules[n].bias) - y
                    reference[(n, f)] += (y.grad.float() * diff.float()).square().sum().item()
    model.get_input_embeddings().weight.requires_grad_(False)
    reference = pd.Series(reference)
    assert (reference > 0).all()
    compared = ours.loc[reference.index]
    assert ((compared - reference).abs() <= 0.02 * reference).all(), (compared / reference).describe()
    assert (ours.xs("BF16", level="format") == 0).all()


def test_fp8_scores_equal_modelopt_auto_quantize(tiny_llama: Path) -> None:
    """Same loss, same max calibration, same FP8 numerics: ModelOpt's gradient scores, to float precision."""
    import modelopt.torch.quantization as mtq

    model, choices, batches = _setup(tiny_llama, "FP8, BF16")
    ours = _scores(model, choices, batches, export_fused_scales=False).xs("FP8", level="format")
    reference_model = load_model(ModelSource(tiny_llama, "tiny"))
    _, state = mtq.auto_quantize(
        reference_model, constraints={"effective_bits": 15.0}, quantization_formats=["FP8_DEFAULT_CFG"],
        data_loader=batches, forward_step=lambda m, ids: m(input_ids=ids, labels=ids), loss_func=lambda out, _: out.loss,
        num_calib_steps=len(batches), num_score_steps=len(batches), disabled_layers="*lm_head*", verbose=False,
    )  # fmt: skip
    compared = 0
    for stats in state["candidate_stats"].values():
        is_fp8 = [str(f).startswith("FP8") for f in stats["formats"]]
        if not any(is_fp8):  # the disabled lm_head
            continue
        modelopt_score = stats["scores"][is_fp8.index(True)]
        assert sum(ours[n] for n in stats["module_names"]) == pytest.approx(modelopt_score, rel=1e-5)
        compared += len(stats["module_names"])
    assert compared == len(ours)


def test_nvfp4_scores_equal_modelopt_auto_quantize_on_the_cpu(tiny_llama: Path) -> None:
    """ModelOpt's NVFP4 kernels are CUDA-only; ``run_auto_quantize`` runs its NVFP4 quantizers on autoq's
    bit-matched implementation off CUDA, so ModelOpt's own search works on the CPU, and its NVFP4
    scores equal autoq's (same loss, same max calibration, same numerics)."""
    from autoq.formats import average_bits
    from autoq.interop.modelopt import CUSTOM_FORMATS, formats_at_honest_bits, run_auto_quantize

    model, choices, batches = _setup(tiny_llama, "NVFP4, FP8, BF16")
    ours = _scores(model, choices, batches, export_fused_scales=False).xs("NVFP4", level="format")
    state, _ = run_auto_quantize(load_model(ModelSource(tiny_llama, "tiny")), [c.name for c in choices], ["NVFP4", "FP8"], batches, 16.0)
    assert state[CUSTOM_FORMATS] == {"CUSTOM_0": "NVFP4"}
    compared = 0
    for stats in state["candidate_stats"].values():
        is_nvfp4 = [str(f).startswith("CUSTOM_0") for f in stats["formats"]]
        if any(is_nvfp4):  # NVFP4 is ModelOpt's cheapest candidate here, so its score is not clamped
            assert sum(ours[n] for n in stats["module_names"]) == pytest.approx(stats["scores"][is_nvfp4.index(True)], rel=1e-5)
            compared += len(stats["module_names"])
    assert compared == len(ours)
    shapes = {c.name: (c.out_features, c.in_features) for c in choices}
    formats, _, dropped = formats_at_honest_bits(state, shapes, 6.0)  # ModelOpt's own plan, at honest bits
    assert "NVFP4" in formats.values() and average_bits(formats, shapes) <= 6.0 and not dropped


def test_more_quantization_error_scores_higher(tiny_llama: Path) -> None:
    """Scale some down_proj columns up and the matching up_proj rows down: the network computes the
    same function (same gradients), but down_proj's weights now have outliers that widen its
    quantization grid, so its scores must rise."""
    model, choices, batches = _setup(tiny_llama, "FP8, W4A8, NVFP4, BF16")
    before = _scores(model, choices, batches)
    modules = dict(model.named_modules())
    down, up = modules["model.layers.0.mlp.down_proj"], modules["model.layers.0.mlp.up_proj"]
    columns = torch.arange(0, down.in_features, 16)  # one per NVFP4 block
    with torch.no_grad():
        down.weight[:, columns] *= 8
        up.weight[columns, :] /= 8
    after = _scores(model, choices, batches)
    down_name, up_name = "model.layers.0.mlp.down_proj", "model.layers.0.mlp.up_proj"
    # NVFP4 blocks of 16 now each hold one 8x value: the other 15 lose resolution.
    assert after[(down_name, "NVFP4")] > 2 * before[(down_name, "NVFP4")]
    # up_proj's smaller rows quantize as finely relative to their size, and their gradients grew
    # by exactly the factor their errors shrank: its scores must not move.
    for fmt in ("FP8", "W4A8", "NVFP4"):
        assert after[(up_name, fmt)] == pytest.approx(before[(up_name, fmt)], rel=0.01)


def test_nvfp4_scores_at_least_fp8(tiny_qwen2: Path) -> None:
    model, choices, batches = _setup(tiny_qwen2)
    scores = _scores(model, choices, batches).unstack("format")
    assert (scores.NVFP4 >= scores.FP8).all()
    assert (scores.W4A8 >= scores.FP8).all()
    assert (scores.FP8 > 0).all() and (scores.BF16 == 0).all()


def test_no_weight_gradients_during_scoring(tiny_llama: Path) -> None:
    model, choices, batches = _setup(tiny_llama, "FP8, BF16")
    observed = []
    probe = dict(model.named_modules())["model.layers.1.mlp.down_proj"]
    probe.register_forward_hook(
        lambda m, a, y: observed.append((torch.is_grad_enabled(), any(p.requires_grad for p in model.parameters())))
    )
    _scores(model, choices, batches)
    assert (True, False) in observed  # the backward recompute ran with autograd on, yet no parameter needs grad
    assert all(not requires for _, requires in observed)
    assert all(p.grad is None for p in model.parameters())


def test_streamed_blocks_give_identical_scores(tiny_llama: Path) -> None:
    """Streaming is real on the CPU too: between their turns the blocks hold empty tensors, so any
    use of a block outside its turn would fail, and each turn works on a fresh copy of the
    block's weights."""
    model, choices, batches = _setup(tiny_llama)
    in_memory = _scores(model, choices, batches)
    probe = model.model.layers[1].mlp.down_proj
    weight = probe.weight.data
    used_with = []
    probe.register_forward_pre_hook(lambda m, a: used_with.append(m.weight.data.data_ptr()))
    streamed = _scores(model, choices, batches, stream_blocks=True, store_on_cpu=True, device="cpu")
    pd.testing.assert_series_equal(in_memory, streamed)
    assert used_with and weight.data_ptr() not in used_with  # every use was of a copy made for its turn
    assert probe.weight.data_ptr() == weight.data_ptr()  # the block's own weights are back afterwards


def _interrupt_second_chunk(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    calls = []
    original = SensitivityEngine._score_chunk

    def crash_on_second(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return original(self, *args, **kwargs)

    monkeypatch.setattr(SensitivityEngine, "_score_chunk", crash_on_second)
    return calls


def test_interrupted_run_resumes_from_cache(tiny_llama: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model, choices, batches = _setup(tiny_llama, "FP8, W4A8, BF16")
    uninterrupted = _scores(model, choices, batches, chunk_steps=1, tokens_per_step=1)

    cache = ScoreCache(tmp_path, {"test": "resume"})
    calls = _interrupt_second_chunk(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        _scores(model, choices, batches, chunk_steps=1, tokens_per_step=1, cache=cache)
    assert list(cache.load_chunks()) == [0] and cache.load_table() is None
    monkeypatch.undo()
    calls.clear()
    original = SensitivityEngine._score_chunk
    monkeypatch.setattr(SensitivityEngine, "_score_chunk", lambda self, *a, **k: (calls.append(1), original(self, *a, **k))[1])
    resumed = _scores(model, choices, batches, chunk_steps=1, tokens_per_step=1, cache=cache)
    assert len(calls) == 1  # only the unfinished chunk was scored again
    pd.testing.assert_series_equal(uninterrupted, resumed)


def test_resume_with_other_chunking_continues_exactly(
    tiny_llama: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """Interrupted with 2 steps per chunk, resumed with 1: the finished chunk (steps 0-1) is reused
    as it is, the rest is scored in chunks of 1, and no step counts twice."""
    model, choices, batches = _setup(tiny_llama, "FP8, W4A8, BF16", batch=1)
    uninterrupted = _scores(model, choices, batches, batch=1, chunk_steps=1, tokens_per_step=1)
    cache = ScoreCache(tmp_path, {"test": "rechunk"})
    _interrupt_second_chunk(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        _scores(model, choices, batches, batch=1, chunk_steps=2, tokens_per_step=1, cache=cache)
    monkeypatch.undo()
    assert {first: end for first, (end, _) in cache.load_chunks().items()} == {0: 2}
    resumed = _scores(model, choices, batches, batch=1, chunk_steps=1, tokens_per_step=1, cache=cache)
    assert "2 of 8 steps already scored" in capsys.readouterr().err
    pd.testing.assert_series_equal(uninterrupted, resumed, rtol=1e-12)


def test_resume_with_other_steps_starts_over(
    tiny_llama: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """Steps of another size hold other batches: the interrupted run's chunks cannot be reused."""
    model, choices, batches = _setup(tiny_llama, "FP8, W4A8, BF16", batch=1)
    cache = ScoreCache(tmp_path, {"test": "restep"})
    _interrupt_second_chunk(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        _scores(model, choices, batches, batch=1, chunk_steps=1, tokens_per_step=1, cache=cache)
    monkeypatch.undo()
    resumed = _scores(model, choices, batches, batch=1, chunk_steps=1, tokens_per_step=128, cache=cache)
    assert "starting over" in capsys.readouterr().err
    fresh = _scores(model, choices, batches, batch=1, chunk_steps=1, tokens_per_step=128)
    pd.testing.assert_series_equal(fresh, resumed)


def test_fused_layers_quantize_their_shared_input_once(tiny_llama: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """q/k/v read one input, gate/up another: per block and format, 4 input quantizations
    (qkv, o, gate/up, down), not 7 — 8 for the 2-block model, one step, one format."""
    model, choices, batches = _setup(tiny_llama, "FP8, BF16")
    calls = []
    original = Format.quantize_input
    monkeypatch.setattr(Format, "quantize_input", lambda self, *a, **k: (calls.append(1), original(self, *a, **k))[1])
    _scores(model, choices, batches)
    assert len(calls) == 8


def test_calibration_holds_at_most_the_store_budget(tiny_llama: Path) -> None:
    """16 steps of 64 tokens: their hidden states alone are 16 x 16 KiB. With a 128 KiB budget,
    the hidden states that do not fit wait in CPU memory and the scores do not change."""
    model, choices, batches = _setup(tiny_llama, "FP8, BF16", samples=16, batch=1)
    budget_gib = 0.125 / 1024
    options = ScoringOptions(batch_size=1, progress=False, tokens_per_step=1, store_budget_gib=budget_gib)
    bounded = SensitivityEngine(model, choices, options)
    table = bounded.run(batches)
    step_bytes = 64 * model.config.hidden_size * 2
    assert len(batches) * step_bytes > budget_gib * 2**30  # calibration alone would not fit
    assert bounded.executor.peak_stored_bytes <= budget_gib * 2**30
    unbounded = _scores(model, choices, batches, batch=1, tokens_per_step=1, store_budget_gib=64.0)
    pd.testing.assert_series_equal(unbounded, table.set_index(["layer", "format"]).score)


def test_scores_do_not_depend_on_how_batches_are_grouped(tiny_llama: Path) -> None:
    model, choices, batches = _setup(tiny_llama, "NVFP4, FP8, BF16")
    one_by_one = _scores(model, choices, batches, tokens_per_step=1)
    together = _scores(model, choices, batches, tokens_per_step=1 << 20)
    pd.testing.assert_series_equal(one_by_one, together, rtol=1e-4)


def test_label_free_kl_objective(tiny_llama: Path) -> None:
    model, choices, batches = _setup(tiny_llama, "NVFP4, FP8, BF16")
    fisher = _scores(model, choices, batches)
    kl = _scores(copy.deepcopy(model), choices, batches, objective="kl")
    again = _scores(model, choices, batches, objective="kl")
    pd.testing.assert_series_equal(kl, again)  # sampled labels are seeded: deterministic
    assert not kl.equals(fisher)
    per_format = kl.unstack("format")
    assert (per_format.NVFP4 >= per_format.FP8).all() and (per_format.FP8 > 0).all()
