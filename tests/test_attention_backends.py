"""SparseViT's attention implementations: every declared one gives eager's logits or is refused with a clear message.

FlexAttention (`attn_implementation="flex_attention"`) takes the boolean connection mask as a block mask (SDPA runs
the layers without one); on CPU flex runs its eager reference for inference, and SDPA where gradients are needed
(flex has no CPU backward). Flash attention cannot take a connection mask: it is refused as soon as attention
sparsity is asked for. No flash kernel exists on a CPU machine; there transformers refuses it itself, which the
table checks too (where `flash_attn` and CUDA exist, the table runs it on CUDA in bf16).
"""

from __future__ import annotations

import copy
import inspect

import pytest
import torch

from hf_sparse import SparseViTConfig, SparseViTForImageClassification
from hf_sparse.models.sparse_vit import modeling_sparse_vit
from hf_sparse.models.sparse_vit.modeling_sparse_vit import SparseViTPreTrainedModel, connection_block_mask

pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")

DECLARED = [
    name
    for name, flag in (
        ("sdpa", "_supports_sdpa"),
        ("flex_attention", "_supports_flex_attn"),
        ("flash_attention_2", "_supports_flash_attn"),
    )
    if getattr(SparseViTForImageClassification, flag)
]
SPARSITY = {
    "dense": {},
    "tokens": {"token_keep_ratio": 0.6},
    "tokens_and_connections": {"token_keep_ratio": 0.6, "attention_keep_ratio": 0.5, "token_fusion": True},
}
FLASH_REFUSAL = r"`attn_implementation`='flash_attention_2' cannot apply attention sparsity \(`attention_keep_ratio`"


def tiny_config(**overrides) -> SparseViTConfig:
    fields = dict(
        hidden_size=32, num_hidden_layers=4, num_attention_heads=2, intermediate_size=64, image_size=16,
        patch_size=2, num_channels=3, num_labels=5,
    )  # 64 patches + CLS: 65 tokens, not a multiple of flex's 128-token blocks
    fields.update(overrides)
    return SparseViTConfig(**fields)


def eager_and(implementation: str, **sparsity) -> tuple[SparseViTForImageClassification, ...]:
    """An eager SparseViT and one with `implementation`, with the same weights."""
    torch.manual_seed(0)
    config = tiny_config(**sparsity)
    eager = SparseViTForImageClassification(copy.deepcopy(config)).eval()
    eager.set_attn_implementation("eager")
    other = SparseViTForImageClassification(copy.deepcopy(config)).eval()
    other.load_state_dict(eager.state_dict())
    other.set_attn_implementation(implementation)
    return eager, other


def flash_runs_here() -> bool:
    try:
        import flash_attn  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.is_available()


def test_flex_and_flash_are_declared():
    assert DECLARED == ["sdpa", "flex_attention", "flash_attention_2"]


def on_flash_device(*models: SparseViTForImageClassification) -> tuple[SparseViTForImageClassification, ...]:
    """Flash kernels run on CUDA in half precision only."""
    return tuple(model.to("cuda", torch.bfloat16) for model in models)


@pytest.mark.parametrize("sparsity", SPARSITY)
@pytest.mark.parametrize("implementation", DECLARED)
def test_declared_implementation_gives_eager_logits_or_a_clear_refusal(implementation, sparsity):
    if implementation.startswith("flash") and not flash_runs_here():
        # transformers' own refusal: no flash kernel on this machine, nothing silently falls back.
        with pytest.raises((ImportError, ValueError), match="(?i)flash"):
            eager_and(implementation, **SPARSITY[sparsity])
        return
    if implementation.startswith("flash") and "attention_keep_ratio" in SPARSITY[sparsity]:
        with pytest.raises(ValueError, match=FLASH_REFUSAL):
            eager_and(implementation, **SPARSITY[sparsity])
        return
    eager, other = eager_and(implementation, **SPARSITY[sparsity])
    assert other.config._attn_implementation == implementation
    pixel_values = torch.randn(3, 3, 16, 16)
    tolerance = dict(atol=1e-5, rtol=1e-5)
    flash = implementation.startswith("flash")
    if flash:  # both models on CUDA in bf16, compared at bf16's precision
        eager, other = on_flash_device(eager, other)
        pixel_values, tolerance = pixel_values.to("cuda", torch.bfloat16), dict(atol=5e-2, rtol=5e-2)
    with torch.no_grad():
        expected, actual = eager(pixel_values), other(pixel_values)
    torch.testing.assert_close(actual.logits, expected.logits, **tolerance)
    if not flash:  # in bf16 two kernels' rounding may swap near-tied tokens after the first layer
        for kept, kept_eager in zip(actual.kept_patch_indices or (), expected.kept_patch_indices or ()):
            assert torch.equal(kept, kept_eager)


def test_flex_runs_flex_attention_with_a_block_mask(monkeypatch):
    """Inference on CPU really goes through torch's flex_attention (not a silent SDPA fallback) in the layers where a
    connection mask is in force, with a block mask; the layers before it run SDPA (fused already without a mask)."""
    calls = []
    real_flex_attention = modeling_sparse_vit.flex_attention

    def recording_flex_attention(query, key, value, block_mask=None, **kwargs):
        calls.append(block_mask)
        return real_flex_attention(query, key, value, block_mask=block_mask, **kwargs)

    monkeypatch.setattr(modeling_sparse_vit, "flex_attention", recording_flex_attention)
    _, flex = eager_and("flex_attention", token_keep_ratio=0.6, attention_keep_ratio=0.5)
    with torch.no_grad():
        flex(torch.randn(2, 3, 16, 16))
    # Pruning layer 1 makes the first mask: layers 0 and 1 run without one (SDPA), 2 and 3 with one (flex).
    assert flex.config.token_pruning_layers[0] == 1
    assert len(calls) == 2 and all(block_mask is not None for block_mask in calls)


def test_flex_builds_one_block_mask_per_connection_mask(monkeypatch):
    """A connection mask changes only at pruning layers: its block mask is built once, by the first layer that runs
    flex with it, and shared by the following layers (not rebuilt in every layer)."""
    builds, flex_block_masks = [], []
    real_connection_block_mask, real_flex_attention = connection_block_mask, modeling_sparse_vit.flex_attention

    def counting_connection_block_mask(attention_mask):
        builds.append(attention_mask)
        return real_connection_block_mask(attention_mask)

    def recording_flex_attention(query, key, value, block_mask=None, **kwargs):
        flex_block_masks.append(block_mask)
        return real_flex_attention(query, key, value, block_mask=block_mask, **kwargs)

    monkeypatch.setattr(modeling_sparse_vit, "connection_block_mask", counting_connection_block_mask)
    monkeypatch.setattr(modeling_sparse_vit, "flex_attention", recording_flex_attention)
    eager, flex = eager_and("flex_attention", num_hidden_layers=6, token_keep_ratio=0.6, attention_keep_ratio=0.5)
    pixel_values = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        expected, actual = eager(pixel_values), flex(pixel_values)
    # Masks made in pruning layers 1, 3 and 4; applied by flex in layers 2 and 3, 4, and 5.
    assert flex.config.token_pruning_layers == [1, 3, 4]
    assert len(flex_block_masks) == 4 and len(builds) == 3
    assert flex_block_masks[0] is flex_block_masks[1]
    assert len({id(block_mask) for block_mask in flex_block_masks}) == 3
    torch.testing.assert_close(actual.logits, expected.logits, atol=1e-5, rtol=1e-5)


class AttentionFunctionsOfTransformers50:
    """transformers 5.0's attention registry as SparseViT uses it: item access only, no `get_interface`."""

    def __init__(self, functions) -> None:
        self.functions = functions
        self.requested: list[str] = []

    def __getitem__(self, name: str):
        self.requested.append(name)
        return self.functions[name]


@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
def test_attention_dispatch_without_get_interface(monkeypatch, implementation):
    """Remote code runs against the user's transformers: without `get_interface` (5.0) the model dispatches by item
    (eager is its own function), and its source keeps what both versions' `set_attn_implementation` looks for."""
    source = inspect.getsource(modeling_sparse_vit)
    assert "ALL_ATTENTION_FUNCTIONS.get_interface(" in source  # 5.24's heuristic
    assert "ALL_ATTENTION_FUNCTIONS[self.config._attn_implementation]" in source  # 5.0's, with eager's function:
    assert "def eager_attention_forward(" in source

    eager, other = eager_and(implementation, token_keep_ratio=0.6, attention_keep_ratio=0.5)
    pixel_values = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        expected = eager(pixel_values)
    registry = AttentionFunctionsOfTransformers50(modeling_sparse_vit.ALL_ATTENTION_FUNCTIONS)
    monkeypatch.setattr(modeling_sparse_vit, "ALL_ATTENTION_FUNCTIONS", registry)
    with torch.no_grad():
        actual = other(pixel_values)
        with_maps = other(pixel_values, output_attentions=True)  # attention maps: eager's function, whatever is set
    torch.testing.assert_close(actual.logits, expected.logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(with_maps.logits, expected.logits, atol=1e-5, rtol=1e-5)
    assert len(with_maps.attentions) == 4 and all(maps is not None for maps in with_maps.attentions)
    assert registry.requested == ([implementation] * 4 if implementation != "eager" else [])


def test_flex_trains_on_cpu_through_sdpa_with_eager_gradients():
    """flex_attention has no CPU backward: training there runs SDPA with the same mask, and learns as eager does."""
    eager, flex = eager_and("flex_attention", token_keep_ratio=0.6, attention_keep_ratio=0.5)
    pixel_values, labels = torch.randn(3, 3, 16, 16), torch.tensor([0, 3, 4])
    for model in (eager, flex):
        model.train()
        model(pixel_values, labels=labels).loss.backward()
    for (name, expected), actual in zip(eager.named_parameters(), flex.parameters()):
        torch.testing.assert_close(actual.grad, expected.grad, atol=1e-5, rtol=1e-4, msg=name)


def test_connection_block_mask_spans_partial_blocks():
    """Over 128 tokens (two blocks, the second partial) flex with the block mask equals SDPA with the boolean mask."""
    torch.manual_seed(0)
    batch, heads, tokens, head_dim = 2, 2, 150, 8
    query, key, value = (torch.randn(batch, heads, tokens, head_dim) for _ in range(3))
    mask = torch.rand(batch, 1, tokens, tokens) < 0.3
    mask[..., 0] = True  # every query keeps the CLS key, as SparseViT's masks do
    mask[:, :, :, 128:] = False  # a whole block without any kept connection: skipped
    mask[0, 0, 5, 140] = True
    expected = torch.nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=mask)
    actual = modeling_sparse_vit.flex_attention(query, key, value, block_mask=connection_block_mask(mask))
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-5)


def test_flash_with_attention_sparsity_is_refused_when_the_model_is_built(monkeypatch):
    # Stand in for a machine where flash attention dispatches, so SparseViT's own check is what answers.
    monkeypatch.setattr(
        SparseViTPreTrainedModel, "_check_and_adjust_attn_implementation", lambda self, name, *a, **k: name
    )
    config = tiny_config(token_keep_ratio=0.6, attention_keep_ratio=0.5)
    config._attn_implementation = "flash_attention_2"
    with pytest.raises(ValueError, match=FLASH_REFUSAL + "=0.5"):
        SparseViTForImageClassification(config)


def test_flash_with_attention_sparsity_set_at_run_time_is_refused_before_the_kernel(monkeypatch):
    """`set_sparsity` can turn attention sparsity on after the model was built: the first layer that would get a
    connection mask refuses, and the flash kernel never sees one."""
    kernel_masks = []

    def flash_stand_in(module, query, key, value, attention_mask, **kwargs):
        kernel_masks.append(attention_mask)
        return torch.nn.functional.scaled_dot_product_attention(query, key, value).transpose(1, 2), None

    monkeypatch.setitem(modeling_sparse_vit.ALL_ATTENTION_FUNCTIONS, "flash_attention_2", flash_stand_in)
    _, model = eager_and("sdpa", token_keep_ratio=0.6)
    model.config._attn_implementation_internal = "flash_attention_2"  # as `set_attn_implementation` leaves it
    with torch.no_grad():
        model(torch.randn(2, 3, 16, 16))  # token sparsity alone: flash runs, without a mask
    assert len(kernel_masks) == 4 and all(mask is None for mask in kernel_masks)
    model.set_sparsity(attention_keep_ratio=0.5)
    with pytest.raises(ValueError, match=FLASH_REFUSAL + "< 1.0"), torch.no_grad():
        model(torch.randn(2, 3, 16, 16))
    assert all(mask is None for mask in kernel_masks)



def test_flex_compiles_into_the_model_graph():
    """Under `torch.compile` (how the fused kernel is reached on a GPU) the block mask and flex_attention are traced
    into one graph, without breaks, and the logits stay eager's (`aot_eager`: CPU inference, seconds)."""
    eager, flex = eager_and("flex_attention", token_keep_ratio=0.6, attention_keep_ratio=0.5)
    compiled = torch.compile(flex, backend="aot_eager", fullgraph=True)
    pixel_values = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(compiled(pixel_values).logits, eager(pixel_values).logits, atol=1e-5, rtol=1e-5)
