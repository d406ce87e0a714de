"""Token selection as a choice and the random alternatives it is measured against (issue 18): random selection at the
pruning layers (`token_selection="random"`), PatchDropout after the embedding (`patch_dropout_keep_ratio`), and the
PatchDropout keep ratio with the training FLOPs of a token-pruning setting."""

from __future__ import annotations

import pytest
import torch
import torch._dynamo
from torch._dynamo.utils import counters

from hf_sparse import SparseViTConfig, SparseViTForImageClassification
from hf_sparse.flops import matched_patch_dropout_keep_ratio, training_flops
from hf_sparse.models.sparse_vit.modeling_sparse_vit import keep_count


def tiny_model(seed: int = 0, **overrides) -> SparseViTForImageClassification:
    """16x16 grey images in 2x2 patches: 64 patches, one pruning layer (0) of two."""
    fields = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, image_size=16,
                  patch_size=2, num_channels=1, num_labels=4, token_pruning_layers=[0], token_keep_ratio=0.5)
    fields.update(overrides)
    torch.manual_seed(seed)
    return SparseViTForImageClassification(SparseViTConfig(**fields))


def pixels(batch_size: int = 8, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch_size, 1, 16, 16, generator=torch.Generator().manual_seed(seed))


def kept_in_training(model: SparseViTForImageClassification, pixel_values: torch.Tensor, seed: int) -> torch.Tensor:
    model.train()
    torch.manual_seed(seed)
    with torch.no_grad():
        return model(pixel_values).kept_patch_indices[0]


# --- token_selection="random" -------------------------------------------------------------------------------------


def test_random_selection_keeps_other_patches_than_cls_attention_from_the_same_weights():
    by_attention, at_random = tiny_model(), tiny_model(token_selection="random")
    for (name, expected), actual in zip(by_attention.state_dict().items(), at_random.state_dict().values()):
        assert torch.equal(expected, actual), name  # the same weights: only the selection differs
    pixel_values = pixels()
    attended, drawn = kept_in_training(by_attention, pixel_values, 0), kept_in_training(at_random, pixel_values, 0)
    assert attended.shape == drawn.shape == (8, 32)  # the same count: keep_count(64, 0.5)
    assert all(len(set(row.tolist())) == 32 for row in drawn)  # distinct patches, in increasing order
    assert torch.all(drawn[:, 1:] > drawn[:, :-1])
    overlap = [len(set(a.tolist()) & set(d.tolist())) for a, d in zip(attended, drawn)]
    assert all(shared < 32 for shared in overlap)  # every image keeps other patches than CLS attention picks
    # evaluation ranks by CLS attention (the documented choice): the two models then keep the same patches
    by_attention.eval(), at_random.eval()
    with torch.no_grad():
        assert torch.equal(by_attention(pixel_values).kept_patch_indices[0], at_random(pixel_values).kept_patch_indices[0])


def test_random_selection_is_uniform_over_the_patches():
    model = tiny_model(token_selection="random")
    kept = kept_in_training(model, pixels(512), seed=0)
    frequency = torch.zeros(512, 64).scatter_(1, kept, 1.0).mean(dim=0)
    # binomial(512, 0.5): a standard deviation of 0.022 per patch; CLS attention would favour some patches
    assert frequency.min() > 0.4 and frequency.max() < 0.6


def test_random_selection_is_reproducible_under_a_seed():
    model = tiny_model(token_selection="random")
    pixel_values = pixels()
    first, again = kept_in_training(model, pixel_values, 7), kept_in_training(model, pixel_values, 7)
    assert torch.equal(first, again)
    assert not torch.equal(first, kept_in_training(model, pixel_values, 8))


def test_random_selection_under_gradient_checkpointing_recomputes_the_same_subset():
    """The recomputation in the backward must keep the patches the forward kept (checkpointing restores the RNG)."""
    model = tiny_model(token_selection="random", token_pruning_layers=[0, 1])
    pixel_values, labels = pixels(4), torch.tensor([0, 1, 2, 3])
    torch.manual_seed(3)
    model(pixel_values, labels=labels).loss.backward()
    reference = {name: parameter.grad.clone() for name, parameter in model.named_parameters()}
    model.zero_grad()
    model.activation_checkpointing_enable()
    model.train()
    torch.manual_seed(3)
    model(pixel_values, labels=labels).loss.backward()
    for name, parameter in model.named_parameters():
        torch.testing.assert_close(parameter.grad, reference[name], atol=1e-6, rtol=1e-5, msg=name)


def test_random_selection_with_fusion_fuses_the_patches_it_did_not_draw():
    model = tiny_model(token_selection="random", token_fusion=True).train()
    torch.manual_seed(0)
    outputs = model(pixels(), output_hidden_states=True)
    assert outputs.kept_patch_indices[0].shape == (8, 32)
    assert outputs.hidden_states[1].shape[1] == 1 + 1 + 32  # CLS, the fused token, the kept patches


# --- PatchDropout ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("use_distillation_token", [False, True])
def test_patch_dropout_drops_once_after_the_embedding_in_training_only(use_distillation_token):
    prefix = 2 if use_distillation_token else 1
    overrides = dict(token_keep_ratio=1.0, use_distillation_token=use_distillation_token)
    model = tiny_model(patch_dropout_keep_ratio=0.3, **overrides)
    plain = tiny_model(**overrides)  # the same weights without PatchDropout
    pixel_values = pixels()
    kept = keep_count(64, 0.3)
    model.train()
    with torch.no_grad():
        embedded = model.sparse_vit.embeddings(pixel_values)  # positions added: what PatchDropout drops from
        torch.manual_seed(0)
        outputs = model(pixel_values, output_hidden_states=True)
    # once, before the first layer: every layer sees the prefix tokens and the same `kept` patches
    assert [states.shape[1] for states in outputs.hidden_states] == [prefix + kept] * 3
    encoder_input = outputs.hidden_states[0]
    torch.testing.assert_close(encoder_input[:, :prefix], embedded[:, :prefix])  # the prefix tokens, kept
    for image in range(8):  # each kept patch is one embedded patch (position included), distinct, in order
        distances = (encoder_input[image, prefix:, None] - embedded[image, None, prefix:]).abs().amax(dim=-1)
        matched = distances.argmin(dim=1)
        assert torch.all(distances.min(dim=1).values == 0)
        assert torch.all(matched[1:] > matched[:-1])
    torch.manual_seed(1)
    with torch.no_grad():
        other_draw = model(pixel_values, output_hidden_states=True).hidden_states[0]
    assert not torch.equal(other_draw, encoder_input)  # a new draw each step
    # evaluation sees every patch: the model is the plain one
    model.eval(), plain.eval()
    with torch.no_grad():
        evaluated = model(pixel_values, output_hidden_states=True)
        torch.testing.assert_close(evaluated.logits, plain(pixel_values).logits)
    assert evaluated.hidden_states[0].shape[1] == prefix + 64


def test_patch_dropout_with_token_pruning_reports_original_patch_indices():
    model = tiny_model(patch_dropout_keep_ratio=0.5, token_keep_ratio=0.5).train()
    torch.manual_seed(0)
    with torch.no_grad():
        outputs = model(pixels(), output_hidden_states=True)
    assert outputs.hidden_states[0].shape[1] == 1 + 32
    pruned = outputs.kept_patch_indices  # after the pruning layer: 16 of the 32 patches PatchDropout kept
    assert len(pruned) == 1 and pruned[0].shape == (8, 16)
    assert int(pruned[0].max()) < 64 and torch.all(pruned[0][:, 1:] > pruned[0][:, :-1])


# --- FLOPs-matched PatchDropout -------------------------------------------------------------------------------------


def demo_config() -> SparseViTConfig:
    """The demo ViT: hidden 96 x 6 layers, 28x28 grey images in 4x4 patches (49 + CLS), pruning layers 1, 3, 4."""
    return SparseViTConfig(hidden_size=96, num_hidden_layers=6, num_attention_heads=4, intermediate_size=384,
                           image_size=28, patch_size=4, num_channels=1, num_labels=10)


def hand_count(counts: list[tuple[int, int]], pruning_layers: tuple[int, ...] = ()) -> float:
    """Training FLOPs of the demo ViT, by hand: (tokens into attention, tokens into the MLP) per layer."""
    hidden, inner = 96, 384
    forward = 2 * 49 * hidden * 16 + 2 * hidden * 10  # patch embedding (all 49 patches) and the classifier
    for layer, (attention, mlp) in enumerate(counts):
        forward += 2 * attention * hidden * hidden * 4 + 2 * 2 * attention * attention * hidden
        forward += 2 * 2 * mlp * hidden * inner
        if layer in pruning_layers:
            forward += 2 * attention * hidden  # the CLS row of the selection scores
    return 3 * forward


def test_flops_matched_patch_dropout_keep_ratio_against_a_hand_count():
    config = demo_config()
    assert config.token_pruning_layers == [1, 3, 4]
    # keep 0.5 at layers 1, 3, 4: 49 -> 25 -> 13 -> 7 patches
    tokens = hand_count([(50, 50), (50, 26), (26, 26), (26, 14), (14, 8), (8, 8)], pruning_layers=(1, 3, 4))
    dense = hand_count([(50, 50)] * 6)
    assert training_flops(config, 0.5) == pytest.approx(tokens, rel=1e-12)
    assert tokens / dense == pytest.approx(0.4843, abs=1e-4)

    def patch_dropout(kept: int) -> float:
        return hand_count([(kept + 1, kept + 1)] * 6)

    ratio = matched_patch_dropout_keep_ratio(config, 0.5)
    assert keep_count(49, ratio) == 24 and ratio == pytest.approx(24 / 49)
    assert training_flops(config, patch_keep_ratio=ratio) == pytest.approx(patch_dropout(24), rel=1e-12)
    # 24 patches is the closest count: 23 and 25 are further from token pruning's FLOPs
    assert abs(patch_dropout(24) - tokens) < min(abs(patch_dropout(23) - tokens), abs(patch_dropout(25) - tokens))
    assert patch_dropout(24) / dense == pytest.approx(0.4811, abs=1e-4)
    # keep 0.7: 49 -> 35 -> 25 -> 18 patches; PatchDropout keeps 32
    tokens = hand_count([(50, 50), (50, 36), (36, 36), (36, 26), (26, 19), (19, 19)], pruning_layers=(1, 3, 4))
    assert keep_count(49, matched_patch_dropout_keep_ratio(config, 0.7)) == 32
    assert abs(patch_dropout(32) - tokens) < min(abs(patch_dropout(31) - tokens), abs(patch_dropout(33) - tokens))


def test_patch_dropout_matched_to_a_whole_run_counts_the_schedules_dense_warm_up_and_decay():
    """A Tri-Level run is dense at first and reaches its final ratio after a cosine: it trains with more FLOPs than
    the final ratio's. Replays the ratios the schedule callback sets at each of 300 steps and sums their FLOPs: the
    PatchDropout count matched with the schedule is the closest to that sum (29 of 49 patches, not 24)."""
    from types import SimpleNamespace

    from hf_sparse.tri_level.schedule import KeepRatioSchedule, KeepRatioScheduleCallback

    config = demo_config()
    set_ratios = []
    model = SimpleNamespace(config=SimpleNamespace(token_keep_ratio=0.5, attention_keep_ratio=1.0),
                            set_sparsity=lambda token, attention: set_ratios.append(token))
    schedule = KeepRatioSchedule()
    callback, steps = KeepRatioScheduleCallback(schedule), 300
    for step in range(steps):
        callback.on_step_begin(None, SimpleNamespace(global_step=step, max_steps=steps), None, model=model)
    assert set_ratios[0] == 1.0 and set_ratios[-1] == 0.5 and len(set(set_ratios)) > 2
    run = sum(training_flops(config, ratio) for ratio in set_ratios)

    ratio = matched_patch_dropout_keep_ratio(config, 0.5, schedule)
    kept = keep_count(49, ratio)
    assert kept == 29 and ratio == pytest.approx(29 / 49)

    def patch_dropout_run(count: int) -> float:
        return steps * training_flops(config, patch_keep_ratio=count / 49)

    assert abs(patch_dropout_run(kept) - run) < min(abs(patch_dropout_run(kept - 1) - run),
                                                    abs(patch_dropout_run(kept + 1) - run))
    assert run / (steps * training_flops(config)) == pytest.approx(0.58, abs=0.01)
    # without the schedule: the final ratio's cost per step, as above
    assert keep_count(49, matched_patch_dropout_keep_ratio(config, 0.5)) == 24


# --- compile, config ----------------------------------------------------------------------------------------------


@pytest.fixture
def fresh_dynamo():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()
    torch.set_num_threads(threads)


def test_random_selection_and_patch_dropout_compile_once_per_keep_ratio(fresh_dynamo):
    """Random draws are tensors: new draws reuse the graph; only a new keep ratio (from the grid) compiles anew."""
    model = tiny_model(token_selection="random", patch_dropout_keep_ratio=0.5).train()
    compiled = torch.compile(model, backend="aot_eager")
    pixel_values, labels = pixels(4), torch.tensor([0, 1, 2, 3])
    kept = []
    for ratio in (0.5, 0.5, 0.75, 0.5, 0.75):
        model.set_sparsity(token_keep_ratio=ratio)
        outputs = compiled(pixel_values, labels=labels)
        outputs.loss.backward()
        kept.append(outputs.kept_patch_indices[0])
    assert [k.shape[1] for k in kept] == [16, 16, 24, 16, 24]  # keep_count(keep_count(64, 0.5), ratio)
    assert not torch.equal(kept[0], kept[1])  # a new draw at every step
    assert counters["stats"]["unique_graphs"] == 2  # one per keep ratio
    assert counters["frames"]["ok"] == counters["frames"]["total"]


@pytest.mark.parametrize(
    "overrides,message",
    [
        ({"token_selection": "topk"}, r"`token_selection` must be one of \['cls_attention', 'random'\], got 'topk'"),
        ({"token_selection": None}, r"`token_selection` must be one of \['cls_attention', 'random'\]"),
        ({"patch_dropout_keep_ratio": 0.0}, r"`patch_dropout_keep_ratio` must be a number in \(0, 1\]"),
        ({"patch_dropout_keep_ratio": 1.5}, r"`patch_dropout_keep_ratio` must be a number in \(0, 1\]"),
    ],
)
def test_config_refuses_bad_values_naming_the_field_and_the_allowed_values(overrides, message):
    with pytest.raises(ValueError, match=message):
        SparseViTConfig(**overrides)


def test_selection_fields_round_trip_and_default_to_the_paper(tmp_path):
    assert SparseViTConfig().token_selection == "cls_attention" and SparseViTConfig().patch_dropout_keep_ratio == 1.0
    model = tiny_model(token_selection="random", patch_dropout_keep_ratio=0.6)
    model.save_pretrained(tmp_path)
    loaded = SparseViTForImageClassification.from_pretrained(tmp_path)
    assert loaded.config.token_selection == "random" and loaded.config.patch_dropout_keep_ratio == 0.6
    assert loaded.sparse_vit.patch_dropout.keep_ratio == 0.6
    assert "token_selection=random" in repr(loaded) and "keep_ratio=0.6 (training only)" in repr(loaded)
