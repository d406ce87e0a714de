"""Weight masks: scores, thresholds, lottery tickets, masked training and saving (tiny models, CPU, offline)."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from safetensors.torch import save_file
from torch import nn
from transformers import ViTConfig, ViTForImageClassification

from hf_sparse.tost.masks import (
    MASK_METHODS,
    MASKS_FILENAME,
    MaskConfig,
    apply_masks,
    compute_masks,
    find_prunable_linears,
    get_masks,
    grasp_scores,
    iterative_magnitude_pruning,
    load_masks,
    mask_sparsity,
    masked_weight_sparsity,
    masks_from_scores,
    prune_model,
    read_masks,
    reapply,
    remove_masks,
    rounds_for_sparsity,
    save_masks,
    snip_scores,
    sparsity_after_rounds,
    sparsity_report,
    synflow_masks,
    synflow_scores,
)


PRUNABLE_SUFFIXES = (
    "attention.q_proj",
    "attention.k_proj",
    "attention.v_proj",
    "attention.o_proj",
    "mlp.fc1",
    "mlp.fc2",
)


def tiny_vit_config(**overrides) -> ViTConfig:
    kwargs = dict(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        image_size=8,
        patch_size=4,
        num_labels=3,
        attn_implementation="eager",
    )
    kwargs.update(overrides)
    return ViTConfig(**kwargs)


def tiny_vit(seed: int = 0, **overrides) -> ViTForImageClassification:
    torch.manual_seed(seed)
    return ViTForImageClassification(tiny_vit_config(**overrides))


def vit_batches(count: int = 2, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    return [
        {
            "pixel_values": torch.randn(4, 3, 8, 8, generator=generator),
            "labels": torch.randint(0, 3, (4,), generator=generator),
        }
        for _ in range(count)
    ]


class TinyMLP(nn.Module):
    """A ViT-block-shaped toy: dense `embed` and `classifier`, prunable `mlp.fc1` / `mlp.fc2`."""

    def __init__(self, in_features: int = 4, hidden: int = 8, classes: int = 3) -> None:
        super().__init__()
        self.embed = nn.Linear(in_features, hidden)
        self.mlp = nn.Module()
        self.mlp.fc1 = nn.Linear(hidden, 2 * hidden)
        self.mlp.activation_fn = nn.GELU()
        self.mlp.fc2 = nn.Linear(2 * hidden, hidden)
        self.classifier = nn.Linear(hidden, classes)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        hidden = self.embed(inputs)
        hidden = hidden + self.mlp.fc2(self.mlp.activation_fn(self.mlp.fc1(hidden)))
        return self.classifier(hidden)


def mlp_batches(count: int = 4, seed: int = 0, batch_size: int = 16) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(batch_size, 4, generator=generator), torch.randint(0, 3, (batch_size,), generator=generator))
        for _ in range(count)
    ]


# --------------------------------------------------------------------------------------------- finding layers


def test_find_prunable_linears_on_hf_vit():
    model = tiny_vit()
    found = find_prunable_linears(model)
    expected = {f"vit.layers.{layer}.{suffix}" for layer in range(2) for suffix in PRUNABLE_SUFFIXES}
    assert set(found) == expected
    assert all(isinstance(module, nn.Linear) for module in found.values())


def test_find_prunable_linears_names_the_patterns_when_nothing_matches():
    with pytest.raises(ValueError, match=r"patterns.*nothing_here") as error:
        find_prunable_linears(tiny_vit(), patterns=r"nothing_here$")
    # the arguments that exist: `mask_patterns` on ToSTTrainingArguments, `patterns` on MaskConfig and the functions
    assert "`mask_patterns` of ToSTTrainingArguments" in str(error.value) and "`patterns=`" not in str(error.value)


# --------------------------------------------------------------------------------------------- target sparsity


@pytest.mark.parametrize("scope", ["global", "layer"])
@pytest.mark.parametrize("method", MASK_METHODS)
def test_every_method_reaches_target_sparsity(method, scope):
    model = tiny_vit()
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    config = MaskConfig(method=method, sparsity=0.7, scope=scope, synflow_rounds=4, seed=0)
    masks = compute_masks(model, config, batches=vit_batches())
    assert all(torch.equal(before[name], tensor) for name, tensor in model.state_dict().items())  # untouched
    assert set(masks) == set(find_prunable_linears(model))
    assert abs(mask_sparsity(masks) - 0.7) < 0.005
    if scope == "layer" or method == "random":
        for mask in masks.values():
            assert abs((1 - mask.float().mean().item()) - 0.7) < 0.005

    handle = apply_masks(model, masks, metadata=config.to_metadata())
    report = sparsity_report(model)
    assert abs(report["prunable_sparsity"] - 0.7) < 0.005
    assert 0 < report["total_sparsity"] < report["prunable_sparsity"]  # classifier, embeddings, norms stay dense
    assert handle.sparsity == pytest.approx(mask_sparsity(masks))


def test_global_threshold_count_is_exact():
    scores = {"a": torch.arange(10.0).view(2, 5), "b": torch.zeros(3, 3)}  # ties at zero
    masks = masks_from_scores(scores, sparsity=0.5)
    assert sum(int(mask.sum()) for mask in masks.values()) == round(0.5 * 19)
    assert masks["a"].flatten()[-5:].all()


# --------------------------------------------------------------------------------------------- scores by hand


class OneLinear(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(3, 2, bias=False)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.fc1(inputs)


def test_snip_scores_equal_abs_grad_times_weight():
    model = OneLinear()
    with torch.no_grad():
        model.fc1.weight.copy_(torch.tensor([[1.0, -2.0, 3.0], [-0.5, 0.25, 4.0]]))
    batches = [torch.tensor([[1.0, 2.0, -1.0]]), torch.tensor([[0.5, -3.0, 2.0]])]
    # L = sum(W x) -> dL/dW[i, j] = x[j]; summed over both batches the gradient is x1 + x2 = [1.5, -1, 1].
    scores = snip_scores(model, batches, loss_fn=lambda net, batch: net(batch).sum(), num_batches=2, patterns="fc1$")
    expected = (model.fc1.weight.detach() * torch.tensor([1.5, -1.0, 1.0])).abs()
    torch.testing.assert_close(scores["fc1"], expected)
    assert model.fc1.weight.grad is None  # scores never touch .grad


def test_magnitude_keeps_the_largest_weights():
    model = TinyMLP()
    masks = compute_masks(model, MaskConfig(method="magnitude", sparsity=0.75, patterns=(r"mlp\.fc\d$",)))
    kept = torch.cat([model.mlp.fc1.weight.abs()[masks["mlp.fc1"]], model.mlp.fc2.weight.abs()[masks["mlp.fc2"]]])
    pruned = torch.cat([model.mlp.fc1.weight.abs()[~masks["mlp.fc1"]], model.mlp.fc2.weight.abs()[~masks["mlp.fc2"]]])
    assert kept.min() >= pruned.max()


def test_random_masks_have_uniform_layer_density_and_follow_the_seed():
    model = tiny_vit()
    config = MaskConfig(method="random", sparsity=0.9, scope="global", seed=3)
    first, second = compute_masks(model, config), compute_masks(model, config)
    for name, mask in first.items():
        assert int(mask.sum()) == round(0.1 * mask.numel())
        assert torch.equal(mask, second[name])
    other = compute_masks(model, MaskConfig(method="random", sparsity=0.9, seed=4))
    assert any(not torch.equal(first[name], other[name]) for name in first)


class PositiveChain(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(2, 3, bias=False)
        self.fc2 = nn.Linear(3, 1, bias=False)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.fc1(inputs))


def test_synflow_scores_match_a_hand_computation():
    model = PositiveChain()
    w1 = torch.tensor([[1.0, 2.0], [-3.0, 0.5], [0.25, 4.0]])  # signs must not matter: SynFlow uses |theta|
    w2 = torch.tensor([[2.0, -1.0, 0.5]])
    with torch.no_grad():
        model.fc1.weight.copy_(w1)
        model.fc2.weight.copy_(w2)
    scores = synflow_scores(model, torch.randn(5, 2), patterns=r"fc\d$")
    a, b = w1.abs().double(), w2.abs().double()
    # R = 1^T B A 1: dR/dA[i, j] = B[0, i]; dR/dB[0, i] = sum_j A[i, j]
    torch.testing.assert_close(scores["fc1"], a * b[0].unsqueeze(1))
    torch.testing.assert_close(scores["fc2"], b * a.sum(dim=1).unsqueeze(0))
    assert torch.equal(model.fc1.weight.detach(), w1)  # the model itself keeps its signs

    # One round keeps the top scores; more rounds still hit the count exactly.
    masks = synflow_masks(model, 0.5, torch.randn(1, 2), rounds=1, patterns=r"fc\d$")
    flat_scores = torch.cat([scores["fc1"].flatten(), scores["fc2"].flatten()])
    flat_masks = torch.cat([masks["fc1"].flatten(), masks["fc2"].flatten()])
    assert flat_scores[flat_masks].min() >= flat_scores[~flat_masks].max()
    masks = synflow_masks(model, 2 / 3, torch.randn(1, 2), rounds=3, patterns=r"fc\d$")
    assert sum(int(mask.sum()) for mask in masks.values()) == 3


class TanhNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(3, 4, bias=False)
        self.fc2 = nn.Linear(4, 2, bias=False)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.tanh(self.fc1(inputs)))


def test_grasp_scores_match_an_explicit_hessian():
    torch.manual_seed(0)
    model = TanhNet().double()
    generator = torch.Generator().manual_seed(1)
    batches = [
        (torch.randn(5, 3, generator=generator, dtype=torch.float64), torch.randint(0, 2, (5,), generator=generator))
        for _ in range(2)
    ]
    temperature = 4.0

    def loss_of(flat: torch.Tensor, batch) -> torch.Tensor:
        inputs, labels = batch
        w1, w2 = flat[:12].view(4, 3), flat[12:].view(2, 4)
        logits = torch.tanh(inputs @ w1.T) @ w2.T
        return nn.functional.cross_entropy(logits / temperature, labels)

    theta = torch.cat([model.fc1.weight.detach().flatten(), model.fc2.weight.detach().flatten()])
    gradient = sum(torch.autograd.functional.jacobian(lambda f: loss_of(f, batch), theta) for batch in batches)
    hessian = sum(torch.autograd.functional.hessian(lambda f: loss_of(f, batch), theta) for batch in batches)
    keep_score = theta * (hessian @ gradient)  # = -S with GraSP's S(-theta) = -theta * Hg

    scores = grasp_scores(model, batches, num_batches=2, temperature=temperature, patterns=r"fc\d$")
    got = torch.cat([scores["fc1"].flatten(), scores["fc2"].flatten()]).double()
    torch.testing.assert_close(got, keep_score, rtol=1e-4, atol=1e-9)

    # GraSP removes the weights with the largest S = -theta * Hg, i.e. keeps the largest theta * Hg.
    config = MaskConfig(
        method="grasp", sparsity=0.5, num_batches=2, grasp_temperature=temperature, patterns=(r"fc\d$",)
    )
    masks = compute_masks(model, config, batches=batches)
    kept = torch.cat([masks["fc1"].flatten(), masks["fc2"].flatten()])
    grasp_s = -keep_score
    assert grasp_s[~kept].min() >= grasp_s[kept].max()


# --------------------------------------------------------------------------------------------- lottery ticket


def sgd_train_fn(batches):
    def train(model: nn.Module, masks: dict[str, torch.Tensor]) -> None:
        optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
        for inputs, labels in batches:
            loss = nn.functional.cross_entropy(model(inputs), labels)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            reapply(model)

    return train


def test_rounds_for_sparsity():
    assert rounds_for_sparsity(0.0) == 0
    assert rounds_for_sparsity(0.2) == 1
    assert rounds_for_sparsity(0.36) == 2  # 1 - 0.8**2 is 0.35999999999999993 in floats
    assert rounds_for_sparsity(0.9) == 11
    assert sparsity_after_rounds(11) == pytest.approx(1 - 0.8**11)
    assert rounds_for_sparsity(0.5, prune_fraction_per_round=0.5) == 1


@pytest.mark.parametrize("scope", ["global", "layer"])
def test_iterative_magnitude_pruning_sparsity_and_rewind_to_init(scope):
    torch.manual_seed(0)
    model = TinyMLP()
    initial = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    seen: list[float] = []
    handle = iterative_magnitude_pruning(
        model,
        sgd_train_fn(mlp_batches()),
        rounds=3,
        scope=scope,
        patterns=r"mlp\.fc\d$",
        on_round_end=lambda round_index, report: seen.append(report["prunable_sparsity"]),
    )
    total = model.mlp.fc1.weight.numel() + model.mlp.fc2.weight.numel()
    for k, sparsity in enumerate(seen, start=1):
        assert abs(sparsity - (1 - 0.8**k)) <= 2 / total
    for name in ("mlp.fc1", "mlp.fc2"):
        mask = handle.masks[name]
        weight = model.get_submodule(name).weight.detach()
        assert torch.equal(weight[mask], initial[f"{name}.weight"][mask])  # survivors rewound to init
        assert (weight[~mask] == 0).all()
    assert torch.equal(model.classifier.weight, initial["classifier.weight"])  # dense tensors rewound too
    assert handle.metadata["method"] == "lottery_ticket"


def test_iterative_magnitude_pruning_rewinds_to_an_early_step_state():
    torch.manual_seed(0)
    model = TinyMLP()
    sgd_train_fn(mlp_batches(2, seed=5))(model, {})
    early = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    handle = iterative_magnitude_pruning(
        model, sgd_train_fn(mlp_batches()), rounds=2, rewind="step", rewind_state=early, patterns=r"mlp\.fc\d$"
    )
    mask = handle.masks["mlp.fc1"]
    assert torch.equal(model.mlp.fc1.weight.detach()[mask], early["mlp.fc1.weight"][mask])
    with pytest.raises(ValueError, match="rewind_state"):
        iterative_magnitude_pruning(TinyMLP(), sgd_train_fn([]), rounds=1, rewind="step", patterns=r"mlp\.fc\d$")


# --------------------------------------------------------------------------------------------- masked training


def _pruned_state_is_zero(optimizer: torch.optim.Optimizer, model: nn.Module) -> bool:
    for module in (model.mlp.fc1, model.mlp.fc2):
        state = optimizer.state[module.weight]
        for key in ("exp_avg", "exp_avg_sq", "momentum_buffer"):
            if key in state and not (state[key][~module.weight_mask] == 0).all():
                return False
    return True


@pytest.mark.parametrize(
    "make_optimizer",
    [
        lambda params: torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1),
        lambda params: torch.optim.SGD(params, lr=0.1, momentum=0.9, weight_decay=1e-3),
    ],
    ids=["adamw", "sgd_momentum"],
)
@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16_autocast"])
def test_masked_weights_stay_zero_through_training(make_optimizer, autocast):
    torch.manual_seed(0)
    model = TinyMLP()
    prune_model(model, MaskConfig(method="magnitude", sparsity=0.6, patterns=(r"mlp\.fc\d$",)))
    before = model.mlp.fc1.weight.detach().clone()
    optimizer = make_optimizer(model.parameters())
    for step_batches in zip(*[iter(mlp_batches(6))] * 2):  # 3 optimizer steps, 2 micro-batches each
        for inputs, labels in step_batches:
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                logits = model(inputs)
            (nn.functional.cross_entropy(logits.float(), labels) / 2).backward()
        optimizer.step()
        optimizer.zero_grad()
        # No reapply(): the gradient hooks alone keep pruned weights and their optimizer state at zero.
        for module in (model.mlp.fc1, model.mlp.fc2):
            assert (module.weight[~module.weight_mask] == 0).all()
        assert _pruned_state_is_zero(optimizer, model)
    mask = model.mlp.fc1.weight_mask
    assert not torch.equal(model.mlp.fc1.weight[mask], before[mask])  # the survivors did train


def test_reapply_rezeroes_weights_written_outside_autograd():
    model = TinyMLP()
    handle = prune_model(model, MaskConfig(method="random", sparsity=0.5, patterns=(r"mlp\.fc\d$",), seed=0))
    with torch.no_grad():
        model.mlp.fc1.weight.fill_(1.0)
    handle.reapply()
    assert torch.equal(model.mlp.fc1.weight != 0, model.mlp.fc1.weight_mask)


def poison_pruned_entries(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """Writes NaN, inf and -3 into three pruned entries of `module.weight` outside autograd (as a custom optimizer or a
    weight load could); returns the pruned entries' indices and the kept values before the write."""
    pruned = (~module.weight_mask).nonzero()
    assert len(pruned) >= 3
    with torch.no_grad():
        for (row, column), value in zip(pruned[:3].tolist(), (float("nan"), float("inf"), -3.0)):
            module.weight[row, column] = value
    return pruned, module.weight.detach()[module.weight_mask].clone()


def test_per_step_reapply_zeroes_finite_writes_and_the_exact_path_every_write():
    torch.manual_seed(0)
    model = TinyMLP()
    prune_model(model, MaskConfig(method="random", sparsity=0.5, patterns=(r"mlp\.fc\d$",), seed=0))
    module = model.mlp.fc1
    pruned, kept = poison_pruned_entries(module)
    (nan_row, nan_column), (inf_row, inf_column), (finite_row, finite_column) = pruned[:3].tolist()

    # Per step, the documented product: the finite write is zeroed, the non-finite ones survive (NaN * 0, inf * 0).
    reapply(model)
    assert module.weight[finite_row, finite_column] == 0
    assert module.weight[nan_row, nan_column].isnan() and module.weight[inf_row, inf_column].isnan()
    assert (module.weight[~module.weight_mask].nan_to_num(nan=0.0) == 0).all()

    # The exact path (what saving uses): every pruned entry is 0, the kept values are untouched.
    reapply(model, exact=True)
    assert (module.weight[~module.weight_mask] == 0).all()
    assert torch.equal(module.weight[module.weight_mask], kept)


def test_saving_clears_non_finite_writes_into_pruned_weights(tmp_path):
    from hf_sparse import ToSTTrainer, ToSTTrainingArguments

    model = tiny_vit()
    handle = prune_model(model, MaskConfig(method="magnitude", sparsity=0.5))
    name = next(iter(handle.masks))
    module = model.get_submodule(name)

    poison_pruned_entries(module)
    save_masks(model, tmp_path / "masks")
    assert (module.weight[~module.weight_mask] == 0).all()

    poison_pruned_entries(module)
    args = ToSTTrainingArguments(output_dir=str(tmp_path / "run"), report_to=[], use_cpu=True)
    ToSTTrainer(model=model, args=args).save_model(str(tmp_path / "saved"))
    saved = ViTForImageClassification.from_pretrained(tmp_path / "saved").get_submodule(name).weight
    assert torch.isfinite(saved).all() and (saved[~module.weight_mask] == 0).all()
    assert torch.equal(saved, module.weight)  # the model in memory was cleared too


def test_nan_and_inf_gradients_of_pruned_weights_do_not_leak():
    torch.manual_seed(0)
    model = TinyMLP()
    prune_model(model, MaskConfig(method="magnitude", sparsity=0.5, patterns=(r"mlp\.fc\d$",)))
    weight, mask = model.mlp.fc1.weight, model.mlp.fc1.weight_mask
    poison = torch.where(mask, 0.0, torch.tensor([float("nan"), float("inf")]).repeat(mask.numel() // 2).view_as(mask))
    handle = weight.register_hook(lambda grad: grad + poison)  # a backward that gives pruned weights NaN / inf
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for inputs, labels in mlp_batches(2):  # twice: the second accumulates onto an existing gradient
        nn.functional.cross_entropy(model(inputs), labels).backward()
        assert torch.isfinite(weight.grad).all() and (weight.grad[~mask] == 0).all()
    assert (weight.grad[mask] != 0).any()
    optimizer.step()
    assert torch.isfinite(weight).all() and (weight[~mask] == 0).all()
    handle.remove()


def test_reapply_works_from_a_cache_without_walking_the_modules(monkeypatch):
    torch.manual_seed(0)
    model = TinyMLP()
    prune_model(model, MaskConfig(method="random", sparsity=0.5, patterns=(r"mlp\.fc\d$",), seed=0))
    reapply(model)  # builds the cache
    walks = []
    original = nn.Module.named_modules

    def counting_named_modules(self, *args, **kwargs):
        walks.append(type(self).__name__)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(nn.Module, "named_modules", counting_named_modules)
    with torch.no_grad():
        for module in (model.mlp.fc1, model.mlp.fc2):
            module.weight.add_(1.0)  # written outside autograd
    expected = {name: module.weight.detach().masked_fill(~module.weight_mask, 0)
                for name, module in (("fc1", model.mlp.fc1), ("fc2", model.mlp.fc2))}
    for _ in range(3):
        reapply(model)
    assert walks == []  # per step: no module walk
    assert torch.equal(model.mlp.fc1.weight, expected["fc1"]) and torch.equal(model.mlp.fc2.weight, expected["fc2"])

    # The cache follows a mask edited in place and a replaced parameter (what `fully_shard` does), with their hooks.
    model.mlp.fc1.weight_mask.fill_(True)
    model.mlp.fc1.weight_mask[0] = False
    model.mlp.fc2.weight = nn.Parameter(torch.ones_like(model.mlp.fc2.weight))
    reapply(model)
    assert (model.mlp.fc1.weight[0] == 0).all() and (model.mlp.fc1.weight[1:] != 0).any()
    assert torch.equal(model.mlp.fc2.weight != 0, model.mlp.fc2.weight_mask)
    inputs, labels = mlp_batches(1)[0]
    nn.functional.cross_entropy(model(inputs), labels).backward()
    assert (model.mlp.fc1.weight.grad[0] == 0).all() and (model.mlp.fc1.weight.grad[1:] != 0).any()
    assert (model.mlp.fc2.weight.grad[~model.mlp.fc2.weight_mask] == 0).all()


def test_masked_weight_sparsity_counts_the_zeros_of_the_masked_weights():
    model = TinyMLP()
    assert masked_weight_sparsity(model) is None
    prune_model(model, MaskConfig(method="magnitude", sparsity=0.5, patterns=(r"mlp\.fc\d$",)))
    with torch.no_grad():
        model.mlp.fc2.weight[0, model.mlp.fc2.weight_mask[0]] = 0.0  # some kept weights are zero too
    assert masked_weight_sparsity(model) == pytest.approx(sparsity_report(model)["prunable_sparsity"])
    assert masked_weight_sparsity(model) > 0.5


def test_deepcopy_gets_its_own_gradient_hooks_and_remove_masks_detaches_everything():
    model = TinyMLP()
    prune_model(model, MaskConfig(method="magnitude", sparsity=0.5, patterns=(r"mlp\.fc\d$",)))
    clone = copy.deepcopy(model)
    reapply(clone)  # re-installs the hooks on the copy's parameters
    inputs, labels = mlp_batches(1)[0]
    for net in (model, clone):
        nn.functional.cross_entropy(net(inputs), labels).backward()
        assert (net.mlp.fc1.weight.grad[~net.mlp.fc1.weight_mask] == 0).all()

    removed = remove_masks(model)
    assert set(removed) == {"mlp.fc1", "mlp.fc2"} and get_masks(model) == {}
    assert not hasattr(model.mlp.fc1, "weight_mask")
    assert (model.mlp.fc1.weight[~removed["mlp.fc1"]] == 0).all()  # zeros stay after removal
    model.zero_grad()
    nn.functional.cross_entropy(model(inputs), labels).backward()
    assert (model.mlp.fc1.weight.grad[~removed["mlp.fc1"]] != 0).any()  # no hook any more


def test_apply_masks_rejects_bad_masks():
    model = TinyMLP()
    with pytest.raises(ValueError, match="lacks"):
        apply_masks(model, {"mlp.fc3": torch.ones(16, 8)})
    with pytest.raises(ValueError, match="module names"):
        apply_masks(model, {"mlp.fc1.weight": torch.ones(16, 8)})
    with pytest.raises(ValueError, match="shape"):
        apply_masks(model, {"mlp.fc1": torch.ones(8, 16)})
    with pytest.raises(ValueError, match="only 0 and 1"):
        apply_masks(model, {"mlp.fc1": torch.full((16, 8), 0.5)})
    with pytest.raises(ValueError, match="only nn.Linear"):
        apply_masks(model, {"mlp": torch.ones(1)})


def test_sparsity_report_counts_all_parameters():
    model = TinyMLP()
    prune_model(model, MaskConfig(method="magnitude", sparsity=0.5, patterns=(r"mlp\.fc\d$",)))
    report = sparsity_report(model)
    assert set(report["layers"]) == {"mlp.fc1", "mlp.fc2"}
    assert report["prunable_params"] == 2 * 16 * 8 and report["prunable_zeros"] == 128
    assert report["total_params"] == sum(p.numel() for p in model.parameters())
    assert report["total_sparsity"] == pytest.approx(128 / report["total_params"])


# --------------------------------------------------------------------------------------------- saving


def test_save_and_load_masks_round_trip(tmp_path):
    model = tiny_vit(seed=0)
    handle = prune_model(model, MaskConfig(method="magnitude", sparsity=0.8))
    path = handle.save(tmp_path)
    assert path == tmp_path / MASKS_FILENAME and path.is_file()

    other = tiny_vit(seed=1)
    loaded = load_masks(other, tmp_path)
    assert set(loaded.masks) == set(handle.masks)
    for name, mask in handle.masks.items():
        assert torch.equal(loaded.masks[name], mask)
        assert (other.get_submodule(name).weight[~mask] == 0).all()
    assert loaded.metadata["method"] == "magnitude"
    assert loaded.metadata["target_sparsity"] == 0.8
    assert loaded.metadata["patterns"] == list(MaskConfig().patterns)
    assert loaded.metadata["sparsity"] == pytest.approx(handle.sparsity)


def test_load_masks_accepts_uint8(tmp_path):
    model = TinyMLP()
    masks = {"mlp.fc1": (torch.rand(16, 8) > 0.5).to(torch.uint8)}
    save_file(masks, str(tmp_path / "m.safetensors"), metadata={"format": "hf_sparse.weight_masks"})
    handle = load_masks(model, tmp_path / "m.safetensors")
    assert torch.equal(handle.masks["mlp.fc1"], masks["mlp.fc1"].bool())


def test_load_masks_errors_name_the_file(tmp_path):
    model = tiny_vit()
    handle = prune_model(model, MaskConfig(method="magnitude", sparsity=0.5))
    path = save_masks(model, tmp_path / "masks.safetensors", metadata=handle.metadata)

    with pytest.raises(ValueError, match=r"masks\.safetensors.*shape"):
        load_masks(tiny_vit(intermediate_size=48), path)
    with pytest.raises(ValueError, match=r"masks\.safetensors.*not nn.Linear"):
        load_masks(TinyMLP(), path)
    deeper = tiny_vit(num_hidden_layers=3)
    with pytest.raises(ValueError, match=r"unmasked.*layers\.2"):
        load_masks(deeper, path)  # pattern check: layer 2 would silently stay dense
    load_masks(deeper, path, strict=False)

    corrupted = tmp_path / "corrupted.safetensors"
    corrupted.write_bytes(path.read_bytes()[:40])
    with pytest.raises(ValueError, match=r"corrupted\.safetensors.*corrupted"):
        load_masks(tiny_vit(), corrupted)
    with pytest.raises(FileNotFoundError, match="nowhere"):
        read_masks(tmp_path / "nowhere")
    foreign = tmp_path / "foreign.safetensors"
    save_file({"vit.layers.0.mlp.fc1": torch.ones(64, 32)}, str(foreign))
    with pytest.raises(ValueError, match="not an hf_sparse mask file"):
        load_masks(tiny_vit(), foreign)


def test_save_pretrained_gives_a_plain_model_with_the_same_zeros(tmp_path):
    model = tiny_vit()
    prune_model(model, MaskConfig(method="snip", sparsity=0.7), batches=vit_batches(1))
    assert set(model.state_dict()) == set(tiny_vit().state_dict())  # masks are not in the state_dict
    model.save_pretrained(tmp_path)
    save_masks(model, tmp_path)

    loaded, info = ViTForImageClassification.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert not any(name.endswith("weight_mask") for name, _ in loaded.named_buffers())
    original = model.state_dict()
    for name, tensor in loaded.state_dict().items():
        assert torch.equal(tensor, original[name]), name
    for name in find_prunable_linears(model):
        assert torch.equal(loaded.get_submodule(name).weight == 0, ~model.get_submodule(name).weight_mask)
    load_masks(loaded, tmp_path)  # and the masks go back on for further training


# --------------------------------------------------------------------------------------------- arguments


@pytest.mark.parametrize(
    ("kwargs", "argument"),
    [
        ({"method": "lottery"}, "method"),
        ({"sparsity": 1.0}, "sparsity"),
        ({"sparsity": -0.1}, "sparsity"),
        ({"scope": "model"}, "scope"),
        ({"synflow_rounds": 0}, "synflow_rounds"),
        ({"num_batches": 0}, "num_batches"),
        ({"patterns": ("(",)}, "patterns"),
    ],
)
def test_mask_config_rejects_bad_arguments(kwargs, argument):
    with pytest.raises(ValueError, match=argument):
        MaskConfig(**kwargs)


def test_bad_arguments_name_the_argument_and_the_allowed_values():
    with pytest.raises(ValueError, match=r"`method`.*'random', 'magnitude', 'snip', 'grasp', 'synflow'"):
        MaskConfig(method="imp")
    with pytest.raises(ValueError, match=r"`scope`.*'global', 'layer'"):
        masks_from_scores({"a": torch.ones(2)}, 0.5, scope="net")
    with pytest.raises(ValueError, match=r"`rewind`.*'init', 'step'"):
        iterative_magnitude_pruning(TinyMLP(), sgd_train_fn([]), rounds=1, rewind="late", patterns=r"mlp\.fc\d$")
    with pytest.raises(ValueError, match="prune_fraction_per_round"):
        iterative_magnitude_pruning(TinyMLP(), sgd_train_fn([]), rounds=1, prune_fraction_per_round=1.0)
    with pytest.raises(ValueError, match="rounds"):
        iterative_magnitude_pruning(TinyMLP(), sgd_train_fn([]), rounds=0)
    with pytest.raises(ValueError, match="batches"):
        compute_masks(tiny_vit(), MaskConfig(method="snip", sparsity=0.5))
    with pytest.raises(ValueError, match="example_inputs"):
        compute_masks(TinyMLP(), MaskConfig(method="synflow", patterns=(r"mlp\.fc\d$",)))
    assert math.isclose(sparsity_after_rounds(1), 0.2)
