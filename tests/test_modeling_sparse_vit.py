"""SparseViT: parity with HF ViT/DeiT, token and attention sparsity, Auto classes, and transformers' model contract."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForImageClassification,
    DeiTConfig,
    DeiTForImageClassification,
    DeiTForImageClassificationWithTeacher,
    ViTConfig,
    ViTForImageClassification,
    ViTImageProcessorPil,
    pipeline,
)

import hf_sparse
from hf_sparse import SparseViTConfig, SparseViTForImageClassification, SparseViTModel
from hf_sparse.models.sparse_vit.modeling_sparse_vit import SparseViTTokenSparsifier, TokenState, keep_count


def tiny_config(**overrides) -> SparseViTConfig:
    fields = dict(
        hidden_size=32,
        num_hidden_layers=4,
        num_attention_heads=2,
        intermediate_size=64,
        image_size=16,
        patch_size=2,
        num_channels=3,
        num_labels=5,
    )
    fields.update(overrides)
    return SparseViTConfig(**fields)


def tiny_vit(**overrides) -> ViTForImageClassification:
    fields = dict(
        hidden_size=32, num_hidden_layers=3, num_attention_heads=2, intermediate_size=48, image_size=16, patch_size=4
    )
    fields.update(overrides)
    torch.manual_seed(0)
    return ViTForImageClassification(ViTConfig(**fields)).eval()


PARITY_CASES = {
    "default": {},
    "no_qkv_bias": {"qkv_bias": False},
    "other_eps": {"layer_norm_eps": 1e-6},
    "grey_patch2": {"num_channels": 1, "patch_size": 2},
    "larger_image": {"image_size": 24, "patch_size": 6, "num_labels": 7},
    "one_label": {"num_labels": 1},
    "relu": {"hidden_act": "relu"},
}


@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
@pytest.mark.parametrize("case", sorted(PARITY_CASES))
def test_logits_match_hf_vit_with_sparsity_off(case, attn_implementation):
    vit = tiny_vit(**PARITY_CASES[case])
    model = SparseViTForImageClassification.from_vit(vit, attn_implementation=attn_implementation).eval()
    assert model.config._attn_implementation == attn_implementation
    pixel_values = torch.randn(3, vit.config.num_channels, vit.config.image_size, vit.config.image_size)
    with torch.no_grad():
        difference = (model(pixel_values).logits - vit(pixel_values).logits).abs().max().item()
    assert difference <= 1e-5


def test_interpolated_position_encoding_matches_hf_vit():
    vit = tiny_vit()
    model = SparseViTForImageClassification.from_vit(vit).eval()
    pixel_values = torch.randn(2, 3, 24, 24)
    with torch.no_grad():
        ours = model(pixel_values, interpolate_pos_encoding=True).logits
        theirs = vit(pixel_values, interpolate_pos_encoding=True).logits
    assert (ours - theirs).abs().max().item() <= 1e-5
    with pytest.raises(ValueError, match="interpolate_pos_encoding"):
        model(pixel_values)


def test_deit_conversion_keeps_distillation_token_and_logits():
    torch.manual_seed(0)
    config = DeiTConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=48, image_size=16, patch_size=4
    )
    deit = DeiTForImageClassification(config).eval()
    model = SparseViTForImageClassification.from_vit(deit).eval()
    assert model.config.use_distillation_token and model.config.num_prefix_tokens == 2
    pixel_values = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert (model(pixel_values).logits - deit(pixel_values).logits).abs().max().item() <= 1e-5
    torch.testing.assert_close(
        model.sparse_vit.embeddings.distillation_token, deit.deit.embeddings.distillation_token
    )


def test_deit_with_teacher_is_refused_clearly():
    config = DeiTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=48, image_size=8, patch_size=4)
    with pytest.raises(ValueError, match="WithTeacher"):
        SparseViTForImageClassification.from_vit(DeiTForImageClassificationWithTeacher(config))


def test_conversion_from_directory_and_strict_key_check(tmp_path):
    vit = tiny_vit()
    vit.save_pretrained(tmp_path)
    model = SparseViTForImageClassification.from_vit(str(tmp_path), token_keep_ratio=0.5)
    assert model.config.token_keep_ratio == 0.5
    source_params = {k: v for k, v in vit.state_dict().items()}
    assert sum(p.numel() for p in model.parameters()) == sum(v.numel() for v in source_params.values())

    from hf_sparse.models.sparse_vit.convert_vit import convert_state_dict

    state = {"vit.encoder.layer.0.attention.attention.query.weight": torch.zeros(1), "vit.extra.weight": torch.zeros(1)}
    with pytest.raises(ValueError, match="vit.extra.weight"):
        convert_state_dict(state, "vit")


def test_conversion_refuses_a_checkpoint_with_a_missing_tensor(tmp_path):
    from safetensors.torch import load_file, save_file

    vit = tiny_vit()
    vit.save_pretrained(tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    weights.pop("vit.layernorm.weight")
    save_file(weights, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match="missing SparseViT keys.*layernorm.weight"):
        SparseViTForImageClassification.from_vit(str(tmp_path))


# --- level 2: tokens --------------------------------------------------------------------------------------------


def hand_made_query_key(patch_scores: torch.Tensor, num_prefix: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Queries/keys whose head-averaged CLS attention over the patches is ordered like `patch_scores` (batch, n)."""
    batch, num_patches = patch_scores.shape
    head_dim = 4
    key = torch.zeros(batch, 2, num_prefix + num_patches, head_dim)
    key[:, :, num_prefix:, 0] = patch_scores[:, None, :]
    query = torch.zeros(batch, 2, num_prefix + num_patches, head_dim)
    query[:, :, :, 0] = 10.0
    return query, key


def test_token_selection_keeps_the_most_attended_patches_in_order():
    config = tiny_config(hidden_size=8, num_attention_heads=2)
    sparsifier = SparseViTTokenSparsifier(config)
    patch_scores = torch.tensor([[0.1, 0.9, 0.3, 0.8, 0.2, 0.7], [0.6, 0.5, 0.4, 0.3, 0.2, 0.1]])
    query, key = hand_made_query_key(patch_scores)
    hidden = torch.arange(2 * 7 * 8, dtype=torch.float32).view(2, 7, 8)
    state = TokenState(patch_ids=torch.arange(6).expand(2, -1), num_special_tokens=1)
    new_hidden, new_state = sparsifier(hidden, query, key, state, token_keep_ratio=0.5, attention_keep_ratio=1.0)
    expected = torch.tensor([[1, 3, 5], [0, 1, 2]])
    assert torch.equal(new_state.patch_ids, expected)
    assert new_hidden.shape == (2, 4, 8)
    for b in range(2):
        torch.testing.assert_close(new_hidden[b, 0], hidden[b, 0])  # CLS first
        torch.testing.assert_close(new_hidden[b, 1:], hidden[b, 1 + expected[b]])


def test_token_fusion_is_the_attention_weighted_mean_of_dropped_patches():
    config = tiny_config(hidden_size=8, num_attention_heads=2, token_fusion=True)
    sparsifier = SparseViTTokenSparsifier(config)
    patch_scores = torch.tensor([[0.1, 0.9, 0.3, 0.8]])
    query, key = hand_made_query_key(patch_scores)
    hidden = torch.randn(1, 5, 8)
    state = TokenState(patch_ids=torch.arange(4)[None], num_special_tokens=1)
    new_hidden, new_state = sparsifier(hidden, query, key, state, token_keep_ratio=0.5, attention_keep_ratio=1.0)
    assert new_state.num_special_tokens == 2 and new_hidden.shape == (1, 4, 8)
    weights = torch.softmax(torch.matmul(query[:, :, :1], key.transpose(2, 3)) * sparsifier.scaling, -1).mean(1)[0, 0]
    dropped = torch.tensor([0, 2])
    expected = (weights[1 + dropped, None] * hidden[0, 1 + dropped]).sum(0) / weights[1 + dropped].sum()
    torch.testing.assert_close(new_hidden[0, 1], expected)


def test_compounding_token_counts_and_kept_indices():
    config = tiny_config(image_size=28, patch_size=2, num_hidden_layers=12, token_keep_ratio=0.7)
    assert config.token_pruning_layers == [3, 6, 9]
    model = SparseViTModel(config).eval()
    with torch.no_grad():
        outputs = model(torch.randn(2, 3, 28, 28), output_hidden_states=True)
    counts = [h.shape[1] for h in outputs.hidden_states]
    assert counts[4] == 1 + 138 and counts[7] == 1 + 97 and counts[10] == 1 + 68 and counts[-1] == 69
    assert [k.shape[1] for k in outputs.kept_patch_indices] == [138, 97, 68]
    for earlier, later in zip(outputs.kept_patch_indices, outputs.kept_patch_indices[1:]):
        for b in range(2):
            assert set(later[b].tolist()) <= set(earlier[b].tolist())


def test_gradients_reach_kept_tokens_only_through_the_values():
    model = SparseViTForImageClassification(tiny_config(token_keep_ratio=0.5, attention_keep_ratio=0.5))
    pixel_values = torch.randn(2, 3, 16, 16, requires_grad=True)
    model(pixel_values, labels=torch.tensor([1, 2])).loss.backward()
    assert pixel_values.grad is not None and pixel_values.grad.abs().sum() > 0
    for name, parameter in model.named_parameters():
        assert parameter.grad is not None, name
    # every layer's projections get a gradient, including after pruning
    assert model.sparse_vit.encoder.layers[-1].mlp.fc2.weight.grad.abs().sum() > 0


# --- level 3: connections ---------------------------------------------------------------------------------------


def test_attention_mask_shapes_density_and_exact_zeros():
    config = tiny_config(token_keep_ratio=0.5, attention_keep_ratio=0.25, num_hidden_layers=4)
    model = SparseViTModel(config).eval()
    with torch.no_grad():
        outputs = model(torch.randn(2, 3, 16, 16), output_attentions=True)
    layers = config.token_pruning_layers  # [1, 2, 3]
    # layer 0 and layer 1 (the first pruning layer's own attention) are dense
    assert (outputs.attentions[0] > 0).all() and (outputs.attentions[1] > 0).all()
    attention = outputs.attentions[2]  # uses the mask made in layer 1: 1 CLS + 32 patches
    assert attention.shape == (2, 2, 33, 33)
    patches = 33 - 1
    per_row = (attention[:, :, 1:, 1:] > 0).sum(-1)
    assert (per_row == keep_count(patches, 0.25)).all()  # exact budget, no row goes dense
    assert (attention[:, :, :, 0] > 0).all() and (attention[:, :, 0, :] > 0).all()  # CLS row and column kept
    torch.testing.assert_close(attention.sum(-1), torch.ones_like(attention.sum(-1)))
    assert layers == [1, 2, 3]


def test_attention_sparsity_alone_keeps_all_tokens():
    model = SparseViTModel(tiny_config(attention_keep_ratio=0.5)).eval()
    with torch.no_grad():
        outputs = model(torch.randn(1, 3, 16, 16), output_attentions=True, output_hidden_states=True)
    assert {h.shape[1] for h in outputs.hidden_states} == {65}
    assert outputs.kept_patch_indices is None
    assert ((outputs.attentions[-1][:, :, 1:, 1:] > 0).sum(-1) == 32).all()


def test_ties_never_make_a_row_dense():
    config = tiny_config(hidden_size=8, num_attention_heads=2)
    sparsifier = SparseViTTokenSparsifier(config)
    query = torch.ones(1, 2, 11, 4)
    key = torch.ones(1, 2, 11, 4)  # every score ties
    state = TokenState(patch_ids=torch.arange(10)[None], num_special_tokens=1)
    hidden = torch.randn(1, 11, 8)
    new_hidden, new_state = sparsifier(hidden, query, key, state, token_keep_ratio=0.5, attention_keep_ratio=0.4)
    assert new_hidden.shape[1] == 6
    mask = new_state.attention_mask
    assert mask.shape == (1, 1, 6, 6)
    assert (mask[0, 0, 1:, 1:].sum(-1) == 2).all()


def test_eager_and_sdpa_give_the_same_logits_with_sparsity():
    torch.manual_seed(0)
    config = tiny_config(token_keep_ratio=0.6, attention_keep_ratio=0.5, token_fusion=True)
    eager = SparseViTForImageClassification(copy.deepcopy(config)).eval()
    eager.set_attn_implementation("eager")
    sdpa = SparseViTForImageClassification(copy.deepcopy(config)).eval()
    sdpa.load_state_dict(eager.state_dict())
    sdpa.set_attn_implementation("sdpa")
    pixel_values = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        a, b = eager(pixel_values), sdpa(pixel_values)
    torch.testing.assert_close(a.logits, b.logits, atol=1e-5, rtol=1e-5)
    for x, y in zip(a.kept_patch_indices, b.kept_patch_indices):
        assert torch.equal(x, y)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_same_selection_under_eager_and_sdpa_in_half_precision(dtype):
    torch.manual_seed(0)
    config = tiny_config(token_keep_ratio=0.5, attention_keep_ratio=0.5)
    eager = SparseViTModel(copy.deepcopy(config)).eval().to(dtype)
    eager.set_attn_implementation("eager")
    sdpa = SparseViTModel(copy.deepcopy(config)).eval().to(dtype)
    sdpa.load_state_dict(eager.state_dict())
    sdpa.set_attn_implementation("sdpa")
    pixel_values = torch.randn(2, 3, 16, 16, dtype=dtype)
    with torch.no_grad():
        a, b = eager(pixel_values), sdpa(pixel_values)
    first_a, first_b = a.kept_patch_indices[0], b.kept_patch_indices[0]
    assert torch.equal(first_a, first_b)  # the first selection sees identical inputs
    agreement = np.mean([torch.isin(x, y).float().mean().item() for x, y in zip(a.kept_patch_indices, b.kept_patch_indices)])
    assert agreement > 0.9  # later layers see half-precision noise from different kernels


def test_each_sample_is_selected_independently_of_the_batch():
    torch.manual_seed(0)
    model = SparseViTForImageClassification(tiny_config(token_keep_ratio=0.5, attention_keep_ratio=0.5)).eval()
    pixel_values = torch.randn(4, 3, 16, 16)
    with torch.no_grad():
        batch = model(pixel_values)
        for i in range(4):
            single = model(pixel_values[i : i + 1])
            torch.testing.assert_close(single.logits[0], batch.logits[i], atol=1e-5, rtol=1e-5)
            for x, y in zip(single.kept_patch_indices, batch.kept_patch_indices):
                assert torch.equal(x[0], y[i])


def test_runtime_ratios_change_without_touching_the_config(tmp_path):
    model = SparseViTForImageClassification(tiny_config(token_keep_ratio=0.8)).eval()
    assert model.get_sparsity() == {"token_keep_ratio": 0.8, "attention_keep_ratio": 1.0}
    model.set_sparsity(token_keep_ratio=0.5, attention_keep_ratio=0.5)
    with torch.no_grad():
        outputs = model(torch.randn(1, 3, 16, 16), output_hidden_states=True)
    assert outputs.hidden_states[2].shape[1] == 1 + 32
    assert model.config.token_keep_ratio == 0.8
    with pytest.raises(ValueError, match="token_keep_ratio"):
        model.set_sparsity(token_keep_ratio=1.5)
    model.save_pretrained(tmp_path)
    reloaded = SparseViTForImageClassification.from_pretrained(tmp_path)
    assert reloaded.get_sparsity() == {"token_keep_ratio": 0.8, "attention_keep_ratio": 1.0}
    model.reset_sparsity()
    assert model.get_sparsity()["token_keep_ratio"] == 0.8


# --- Auto classes, save/load, pipeline ----------------------------------------------------------------------------


def test_auto_classes_round_trip(tmp_path):
    config = tiny_config(token_keep_ratio=0.7, attention_keep_ratio=0.5)
    model = AutoModelForImageClassification.from_config(copy.deepcopy(config)).eval()
    assert isinstance(model, SparseViTForImageClassification)
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    assert isinstance(AutoConfig.from_pretrained(tmp_path), SparseViTConfig)
    reloaded = AutoModelForImageClassification.from_pretrained(tmp_path).eval()
    pixel_values = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(model(pixel_values).logits, reloaded(pixel_values).logits)
    base = AutoModel.from_pretrained(tmp_path)
    assert isinstance(base, SparseViTModel)
    torch.testing.assert_close(base.embeddings.cls_token, model.sparse_vit.embeddings.cls_token)


def test_loading_with_a_different_head_size(tmp_path):
    SparseViTForImageClassification(tiny_config(num_labels=5)).save_pretrained(tmp_path)
    model = SparseViTForImageClassification.from_pretrained(tmp_path, num_labels=3, ignore_mismatched_sizes=True)
    assert model.classifier.weight.shape == (3, 32)
    assert model(torch.randn(1, 3, 16, 16)).logits.shape == (1, 3)


def test_image_classification_pipeline(tmp_path):
    config = tiny_config(num_labels=3, id2label={0: "a", 1: "b", 2: "c"}, label2id={"a": 0, "b": 1, "c": 2})
    SparseViTForImageClassification(config).save_pretrained(tmp_path)
    ViTImageProcessorPil(size={"height": 16, "width": 16}, image_mean=[0.5] * 3, image_std=[0.5] * 3).save_pretrained(tmp_path)
    classifier = pipeline("image-classification", model=str(tmp_path))
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (20, 20, 3), dtype=np.uint8))
    predictions = classifier(image)
    assert {p["label"] for p in predictions} == {"a", "b", "c"}
    assert math.isclose(sum(p["score"] for p in predictions), 1.0, rel_tol=1e-4)


# --- transformers' common model contract ----------------------------------------------------------------------------


def test_tuple_outputs_with_return_dict_false():
    model = SparseViTForImageClassification(tiny_config()).eval()
    pixel_values = torch.randn(1, 3, 16, 16)
    with torch.no_grad():
        as_tuple = model(pixel_values, labels=torch.tensor([1]), return_dict=False)
        as_dict = model(pixel_values, labels=torch.tensor([1]))
    assert isinstance(as_tuple, tuple)
    torch.testing.assert_close(as_tuple[0], as_dict.loss)
    torch.testing.assert_close(as_tuple[1], as_dict.logits)


def test_input_embeddings_and_gradient_checkpointing():
    torch.manual_seed(0)
    config = tiny_config(token_keep_ratio=0.5, attention_keep_ratio=0.5, hidden_dropout_prob=0.0)
    model = SparseViTForImageClassification(config)
    assert model.get_input_embeddings() is model.sparse_vit.embeddings.patch_embeddings
    pixel_values, labels = torch.randn(2, 3, 16, 16), torch.tensor([0, 1])
    model(pixel_values, labels=labels).loss.backward()
    reference = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    model.activation_checkpointing_enable()
    assert all(layer.gradient_checkpointing for layer in model.sparse_vit.encoder.layers)
    model.train()
    model(pixel_values, labels=labels).loss.backward()
    for name, parameter in model.named_parameters():
        torch.testing.assert_close(parameter.grad, reference[name], atol=1e-6, rtol=1e-5)


def test_init_weights_covers_every_parameter():
    config = tiny_config(initializer_range=1e-10, use_distillation_token=True)
    model = SparseViTForImageClassification(config)
    for name, parameter in model.named_parameters():
        if "layernorm" in name and name.endswith("weight"):
            assert torch.all(parameter == 1), name
        else:
            # every other tensor is drawn with std 1e-10 or zeroed: a tensor left at torch's default init is not
            assert parameter.abs().max() < 1e-8, name
    assert len(list(model.buffers())) == 0


def test_output_attentions_and_hidden_states_like_hf_vit():
    vit = tiny_vit()
    model = SparseViTForImageClassification.from_vit(vit, attn_implementation="sdpa").eval()
    pixel_values = torch.randn(1, 3, 16, 16)
    with torch.no_grad():
        ours = model(pixel_values, output_attentions=True, output_hidden_states=True)
        vit.set_attn_implementation("eager")
        theirs = vit(pixel_values, output_attentions=True, output_hidden_states=True)
    assert len(ours.attentions) == len(theirs.attentions) and len(ours.hidden_states) == len(theirs.hidden_states)
    for a, b in zip(ours.attentions, theirs.attentions):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    for a, b in zip(ours.hidden_states, theirs.hidden_states):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


# --- bad configs ------------------------------------------------------------------------------------------------------

BAD_CONFIGS = [
    ({"token_keep_ratio": 0.0}, "token_keep_ratio"),
    ({"token_keep_ratio": 1.2}, "token_keep_ratio"),
    ({"attention_keep_ratio": -0.5}, "attention_keep_ratio"),
    ({"attention_keep_ratio": "half"}, "attention_keep_ratio"),
    ({"token_pruning_layers": [1, 9]}, "token_pruning_layers"),
    ({"token_pruning_layers": [2, 1]}, "token_pruning_layers"),
    ({"token_pruning_layers": [1, 1]}, "token_pruning_layers"),
    ({"token_pruning_layers": "3,6"}, "token_pruning_layers"),
    ({"num_attention_heads": 3}, "num_attention_heads"),
    ({"hidden_size": 0}, "hidden_size"),
    ({"patch_size": 32}, "patch_size"),
    ({"hidden_act": "swishy"}, "hidden_act"),
    ({"token_fusion": "yes"}, "token_fusion"),
    ({"hidden_dropout_prob": 1.0}, "hidden_dropout_prob"),
    ({"layer_norm_eps": 0}, "layer_norm_eps"),
]


@pytest.mark.parametrize("overrides,field", BAD_CONFIGS)
def test_bad_config_values_raise_value_errors_naming_the_field(overrides, field):
    with pytest.raises(ValueError, match=field):
        tiny_config(**overrides)


def test_default_pruning_layers_scale_with_depth():
    from hf_sparse.models.sparse_vit.configuration_sparse_vit import default_token_pruning_layers

    assert default_token_pruning_layers(12) == [3, 6, 9]
    assert default_token_pruning_layers(6) == [1, 3, 4]
    assert default_token_pruning_layers(2) == [0, 1]
    assert default_token_pruning_layers(1) == [0]


def test_package_registers_the_model_type():
    assert AutoConfig.for_model("sparse_vit").__class__ is SparseViTConfig
    assert hf_sparse.SparseViTConfig is SparseViTConfig


def test_grey_model_in_an_image_pipeline_takes_rgb_inputs_as_luma(tmp_path):
    config = tiny_config(num_channels=1, num_labels=2, id2label={0: "a", 1: "b"}, label2id={"a": 0, "b": 1})
    model = SparseViTForImageClassification(config).eval()
    model.save_pretrained(tmp_path)
    ViTImageProcessorPil(size={"height": 16, "width": 16}, image_mean=[0.5] * 3, image_std=[0.5] * 3).save_pretrained(tmp_path)
    grey = np.random.default_rng(0).integers(0, 255, (16, 16), dtype=np.uint8)
    predictions = pipeline("image-classification", model=str(tmp_path))(Image.fromarray(grey, mode="L"))
    with torch.no_grad():
        expected = model(torch.tensor((grey / 255.0 - 0.5) / 0.5, dtype=torch.float32)[None, None]).logits.softmax(-1)
    by_label = {p["label"]: p["score"] for p in predictions}
    assert by_label["a"] == pytest.approx(expected[0, 0].item(), abs=1e-4)
    with pytest.raises(ValueError, match="num_channels"):
        model(torch.randn(1, 2, 16, 16))


# --- bf16 autocast, predictions, printing and the luma warning -------------------------------------------------------


def kept_membership(kept_indices: torch.Tensor, num_patches: int) -> torch.Tensor:
    return torch.zeros(kept_indices.shape[0], num_patches, dtype=torch.bool).scatter_(1, kept_indices, True)


def test_selection_scores_stay_float32_under_bf16_autocast():
    config = tiny_config()
    sparsifier = SparseViTTokenSparsifier(config)
    batch, tokens, heads, head_dim = 8, 65, 2, 16
    torch.manual_seed(0)
    hidden = torch.randn(batch, tokens, config.hidden_size)
    # small queries and keys, as at initialisation: nearly uniform attention, where bf16 rounding ties the scores
    query, key = 0.1 * torch.randn(batch, heads, tokens, head_dim), 0.1 * torch.randn(batch, heads, tokens, head_dim)

    def select(token_keep_ratio: float, attention_keep_ratio: float) -> TokenState:
        state = TokenState(patch_ids=torch.arange(tokens - 1).expand(batch, -1), num_special_tokens=1)
        return sparsifier(hidden, query, key, state, token_keep_ratio, attention_keep_ratio)[1]

    float32_tokens, float32_connections = select(0.5, 1.0), select(1.0, 0.5)
    with torch.autocast("cpu", torch.bfloat16):
        autocast_tokens, autocast_connections = select(0.5, 1.0), select(1.0, 0.5)
    assert (autocast_tokens.patch_ids == float32_tokens.patch_ids).float().mean() >= 0.99
    assert (autocast_connections.attention_mask == float32_connections.attention_mask).float().mean() >= 0.99

    # the whole model (its projections in bf16): the first pruning layer keeps the same patches
    model = SparseViTForImageClassification(tiny_config(token_keep_ratio=0.5)).eval()
    pixel_values = torch.randn(16, 3, 16, 16)
    with torch.no_grad():
        float32_kept = model(pixel_values).kept_patch_indices[0]
        with torch.autocast("cpu", torch.bfloat16):
            autocast_kept = model(pixel_values).kept_patch_indices[0]
    shared = kept_membership(float32_kept, 64) & kept_membership(autocast_kept, 64)
    assert shared.sum() >= 0.99 * float32_kept.numel()


def test_trainer_predictions_are_the_logits_with_token_pruning(tmp_path):
    from transformers import Trainer, TrainingArguments

    from hf_sparse import TriLevelTrainer, TriLevelTrainingArguments
    from tri_level_helpers import tiny_image_dataset, tiny_sparse_vit, with_tiny_transform

    data = with_tiny_transform(tiny_image_dataset(16), train=False)
    common = dict(per_device_eval_batch_size=8, report_to=[], use_cpu=True, disable_tqdm=True)

    def accuracy(prediction) -> dict[str, float]:  # the usual compute_metrics
        return {"accuracy": float((np.argmax(prediction.predictions, -1) == prediction.label_ids).mean())}

    trainers = {
        "Trainer": Trainer(
            model=tiny_sparse_vit(token_keep_ratio=0.5, attention_keep_ratio=0.5), eval_dataset=data,
            args=TrainingArguments(output_dir=str(tmp_path / "plain"), remove_unused_columns=False, **common),
            compute_metrics=accuracy,
        ),
        "TriLevelTrainer": TriLevelTrainer(
            model=tiny_sparse_vit(token_keep_ratio=0.5, attention_keep_ratio=0.5), eval_dataset=data,
            args=TriLevelTrainingArguments(output_dir=str(tmp_path / "tri"), **common), compute_metrics=accuracy,
        ),
    }
    for name, trainer in trainers.items():
        assert 0.0 <= trainer.evaluate()["eval_accuracy"] <= 1.0, name
        prediction = trainer.predict(data)
        assert isinstance(prediction.predictions, np.ndarray) and prediction.predictions.shape == (16, 4), name
        # whoever asks still gets the kept indices (a compute_metrics that reads them is the caller's own)
        trainer.compute_metrics = None
        logits, kept_patch_indices = trainer.predict(data, ignore_keys=[]).predictions
        np.testing.assert_allclose(logits, prediction.predictions, rtol=1e-6)
        assert [kept.shape for kept in kept_patch_indices] == [(16, 8), (16, 4)], name


def test_print_shows_the_sparsifiers_ratios_in_force():
    model = SparseViTForImageClassification(tiny_config(token_keep_ratio=0.5, token_pruning_layers=[1, 3]))
    assert str(model).count(
        "(sparsifier): SparseViTTokenSparsifier(token_keep_ratio=0.5, attention_keep_ratio=1, token_fusion=False)"
    ) == 2
    model.set_sparsity(token_keep_ratio=0.75, attention_keep_ratio=0.5)
    assert str(model).count("SparseViTTokenSparsifier(token_keep_ratio=0.75, attention_keep_ratio=0.5") == 2
    assert "sparsifier" not in str(SparseViTForImageClassification(tiny_config(token_pruning_layers=[])))


def test_grey_model_says_once_when_it_trains_on_rgb_luma():
    from transformers.testing_utils import CaptureLogger
    from transformers.utils import logging as transformers_logging

    from hf_sparse.models.sparse_vit import modeling_sparse_vit

    transformers_logging.warning_once.cache_clear()
    model = SparseViTForImageClassification(tiny_config(num_channels=1))
    rgb = torch.randn(2, 3, 16, 16)
    with CaptureLogger(modeling_sparse_vit.logger) as evaluation:
        model.eval()(rgb)  # the image pipeline's case: silent
    with CaptureLogger(modeling_sparse_vit.logger) as training:
        model.train()
        model(rgb)
        model(rgb)
        model(torch.randn(2, 1, 16, 16))
    assert evaluation.out == ""
    assert training.out.count("luma") == 1 and "num_channels`=1" in training.out
