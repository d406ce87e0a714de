"""ToST on a ResNet as its authors built it (VITA-Group/ToST): the dense 1x1 ghost branch joined after the batch norm,
trained with the run's optimizer and deleted with its state, and GradInit's 180 iterations (tiny models, CPU)."""

from __future__ import annotations

import os

import pytest
import torch
from safetensors.torch import load_file
from transformers import TrainerCallback

from hf_sparse import ToSTTrainer, ToSTTrainingArguments
from hf_sparse.tost import apply_masks, get_masks
from hf_sparse.tost.ghosts import GHOST_BRANCHES_FILENAME, ConvGhostBranches, GhostSkips, attach_ghost_skips
from hf_sparse.tost.masks import DEFAULT_PRUNABLE_PATTERNS, find_prunable_layers

from tri_level_helpers import StopAt, tiny_image_dataset, tiny_resnet, with_tiny_transform


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def data():
    return with_tiny_transform(tiny_image_dataset(64), train=False)


def arguments(output_dir, **overrides) -> ToSTTrainingArguments:
    fields = dict(output_dir=str(output_dir), max_steps=6, per_device_train_batch_size=8, learning_rate=0.05,
                  optim="sgd", optim_args="momentum=0.9", lr_scheduler_type="cosine", logging_steps=1,
                  save_strategy="no", report_to=[], use_cpu=True, seed=0, disable_tqdm=True, mask_method="snip",
                  sparsity=0.9, ghost_soft_neurons=False, ghost_skip_connections=True, ghost_end_fraction=0.5,
                  rescaled_init="none", label_smoothing=0.0)
    fields.update(overrides)
    return ToSTTrainingArguments(**fields)


def quadrant_batches(generator: torch.Generator, count: int = 4, size: int = 28) -> list[tuple[torch.Tensor, ...]]:
    """Grey images whose class (of 4) is the bright quadrant."""
    batches = []
    for _ in range(count):
        labels = torch.randint(0, 4, (32,), generator=generator)
        pixels = torch.rand(32, 1, size, size, generator=generator) * 0.4 - 1
        half = size // 2
        for index, label in enumerate(labels.tolist()):
            row, column = divmod(label, 2)
            pixels[index, 0, row * half:(row + 1) * half, column * half:(column + 1) * half] += 1.2
        batches.append((pixels, labels))
    return batches


def masked_gradient_norm(model, batches) -> float:
    model.zero_grad()
    for pixels, labels in batches:
        model(pixel_values=pixels, labels=labels).loss.backward()
    modules = dict(model.named_modules())
    return torch.sqrt(sum(modules[n].weight.grad[m].pow(2).sum() for n, m in get_masks(model).items())).item()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_ghost_branch_keeps_the_gradient_of_the_masked_weights_at_99_percent(seed):
    # the benchmark's ResNet (16-32-64, two blocks per stage) on 28 px images, 99 % of every convolution pruned
    model = tiny_resnet(seed=seed, embedding_size=16, hidden_sizes=[16, 32, 64], depths=[2, 2, 2])
    generator = torch.Generator().manual_seed(seed)
    layers = find_prunable_layers(model, DEFAULT_PRUNABLE_PATTERNS)
    masks = {name: torch.rand(layer.weight.shape, generator=generator) >= 0.99 for name, layer in layers.items()}
    apply_masks(model, masks)
    model.train()
    batches = quadrant_batches(generator)
    without = masked_gradient_norm(model, batches)

    ghosts = attach_ghost_skips(model)  # alpha = 1: the start of the ghost phase
    assert isinstance(ghosts, ConvGhostBranches)
    with_branches = masked_gradient_norm(model, batches)
    ghosts.remove()
    assert with_branches >= 0.5 * without, (with_branches, without)

    # our earlier form, a parameter-free copy of the input added before the batch norm, starves them
    before_norm = GhostSkips({name: layers[name] for name in masks})
    starved = masked_gradient_norm(model, batches)
    before_norm.remove()
    assert starved < 0.3 * without, (starved, without)


def test_ghost_branch_is_the_authors_and_joins_after_the_batch_norm():
    model = tiny_resnet()
    ghosts = attach_ghost_skips(model)  # no masks: the default prunable convolutions
    # the 3x3 convolutions only, not the 1x1 shortcut
    assert ghosts.module_names == [
        "resnet.encoder.stages.0.layers.0.layer.0.convolution", "resnet.encoder.stages.0.layers.0.layer.1.convolution",
        "resnet.encoder.stages.1.layers.0.layer.0.convolution", "resnet.encoder.stages.1.layers.0.layer.1.convolution"]
    name = "resnet.encoder.stages.1.layers.0.layer.0"  # strided: 8 -> 16 channels, stride 2
    branch = ghosts.branches[f"{name}.convolution".replace(".", "__")]
    assert branch.convolution.kernel_size == (1, 1) and branch.convolution.stride == (2, 2)
    assert branch.convolution.bias is None and torch.all(branch.convolution.weight == 1e-4)
    assert isinstance(branch.normalization, torch.nn.BatchNorm2d)
    assert not any("ghost" in key or "branch" in key for key in model.state_dict())  # the model holds only hooks

    layer = model.get_submodule(name)
    model.train()
    hidden = torch.randn(4, 8, 4, 4)
    ghosts.set_progress(0.25)  # alpha = 0.75
    output = layer(hidden)
    ghosts.set_progress(1.0)  # alpha = 0: the hooks add nothing, so the parts can be computed on their own
    expected = layer.activation(layer.normalization(layer.convolution(hidden)) + 0.75 * branch(hidden))
    torch.testing.assert_close(output, expected)
    ghosts.remove()
    torch.testing.assert_close(layer(hidden), layer.activation(layer.normalization(layer.convolution(hidden))))


class BranchRecorder(TrainerCallback):
    """Per step: how many optimizer groups, and the first branch weight."""

    def __init__(self, trainer_ghosts):
        self.ghosts = trainer_ghosts
        self.steps = []

    def on_step_end(self, args, state, control, optimizer=None, **kwargs):
        branches = self.ghosts.branches
        weight = None if branches is None else next(iter(branches.branches.values())).convolution.weight
        self.steps.append((state.global_step, len(optimizer.param_groups),
                           None if weight is None else weight.detach().clone()))


def test_branches_train_with_the_optimizer_and_leave_nothing(tmp_path, data):
    model = tiny_resnet()
    keys = list(model.state_dict())
    trainer = ToSTTrainer(model=model, args=arguments(tmp_path), train_dataset=data)
    recorder = BranchRecorder(trainer.ghosts)
    trainer.add_callback(recorder)
    trainer.train()
    groups = [count for _, count, _ in recorder.steps]
    assert groups == [4, 4, 4, 2, 2, 2]  # the model's two groups + the branches' two, dropped after step 3
    first, second = recorder.steps[0][2], recorder.steps[1][2]
    assert not torch.all(first == 1e-4) and not torch.equal(first, second)  # trained by the run's optimizer
    assert trainer.ghost_removed_at_step == 3 and trainer.ghosts.branches is None
    optimizer = trainer.optimizer
    assert sum(len(group["params"]) for group in optimizer.param_groups) == len(list(model.parameters()))
    assert len(optimizer.state) <= len(list(model.parameters()))  # no state left for the branches
    trainer.save_model(str(tmp_path / "final"))
    saved = load_file(os.path.join(tmp_path, "final", "model.safetensors"))
    assert sorted(saved) == sorted(key for key in keys if key in saved) and len(saved) == len(
        [k for k in keys if not k.endswith("weight_mask")]) or set(saved) <= set(keys)
    assert not any("branch" in key or "ghost" in key for key in saved)


def test_resume_within_the_ghost_phase_restores_the_branches(tmp_path, data):
    common = dict(max_steps=8, ghost_end_fraction=0.75, save_strategy="steps", save_steps=3)
    full = ToSTTrainer(model=tiny_resnet(), args=arguments(tmp_path / "full", **common), train_dataset=data)
    full.train()
    stopped = ToSTTrainer(model=tiny_resnet(), args=arguments(tmp_path / "resumed", **common), train_dataset=data,
                          callbacks=[StopAt(3)])
    stopped.train()
    checkpoint = tmp_path / "resumed" / "checkpoint-3"
    branches = load_file(str(checkpoint / GHOST_BRANCHES_FILENAME))
    assert any(key.endswith("convolution.weight") for key in branches)
    assert not any("normalization.running_mean" in key and "__" in key
                   for key in load_file(str(checkpoint / "model.safetensors")))  # the model file holds no branch
    resumed = ToSTTrainer(model=tiny_resnet(seed=7), args=arguments(tmp_path / "resumed", **common),
                          train_dataset=data)
    resumed.train(resume_from_checkpoint=str(checkpoint))
    assert resumed.ghost_removed_at_step == full.ghost_removed_at_step == 6
    for (name, a), (_, b) in zip(full.model.state_dict().items(), resumed.model.state_dict().items()):
        if a.is_floating_point():  # the branches' weights and momentum came back: the same run
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4, msg=name)

    missing = tmp_path / "missing"
    os.makedirs(missing)
    for file in os.listdir(checkpoint):
        if file != GHOST_BRANCHES_FILENAME:
            os.link(checkpoint / file, missing / file)
    with pytest.raises(FileNotFoundError, match=GHOST_BRANCHES_FILENAME):
        ToSTTrainer(model=tiny_resnet(), args=arguments(tmp_path / "again", **common),
                    train_dataset=data).train(resume_from_checkpoint=str(missing))


def test_gradinit_runs_the_authors_180_iterations_and_moves_the_scales(tmp_path, data):
    # a 6-step run: GradInit's iterations do not shrink with it (they were min(180, 2 % of the steps) = 1)
    trainer = ToSTTrainer(model=tiny_resnet(), train_dataset=data,
                          args=arguments(tmp_path, ghost_skip_connections=False, rescaled_init="gradinit"))
    setup = trainer.setup_sparsity()
    assert setup["rescaled_init_steps"] == 180 and trainer.gradinit_report.steps == 180
    assert setup["rescaled_init_seconds"] > 0
    scales = trainer.gradinit_report.scales
    assert any(name.endswith("bias") for name in scales)  # biases scaled, as the ToST code
    weights = [scale for name, scale in scales.items() if not name.endswith("bias")]
    assert max(abs(scale - 1.0) for scale in weights) > 0.15, weights
    modules = dict(trainer.model.named_modules())
    for name, mask in get_masks(trainer.model).items():
        assert torch.count_nonzero(modules[name].weight[~mask]) == 0


def test_cifar_like_regime_feeds_the_resnet_14_px_maps_with_crop_and_flip():
    from hf_sparse.experiments.bench_tost import ToSTBenchArguments, _settings, plan_grid
    from hf_sparse.experiments.common import ModelArguments

    args = ToSTBenchArguments(families=["resnet", "sparse_vit"], regime="cifar_like")
    assert args.sparsities == [0.95, 0.98] and args.techniques == ["ghost_skips+ghost_neurons"]
    assert args.seeds == [42, 43, 44] and args.technique_seeds == 3  # the pair runs on every seed, as vanilla
    assert len(plan_grid(args)) == 2 * 3 * 2 * 6 * 2  # families x seeds x sparsities x masks x (vanilla, the pair)
    assert ToSTBenchArguments(regime="cifar_like", seeds=[43]).technique_seeds == 1  # a stream of one seed
    assert ToSTBenchArguments(families=["resnet"]).technique_seeds == 1  # the default regime: one seed each
    data = args.data_arguments("resnet")
    assert (data.image_size, data.random_crop_padding, data.horizontal_flip) == (56, 7, True)
    assert args.family("resnet").epochs == 30
    # the stem (stride 2, max-pool) takes 56 px to the first stage's 14 px maps
    model = tiny_resnet(embedding_size=16, hidden_sizes=[16, 32, 64], depths=[1, 1, 1])
    assert model.resnet.embedder(torch.zeros(1, 1, 56, 56)).shape[-1] == 14
    assert args.data_arguments("sparse_vit").image_size is None  # the ViT keeps its images
    default = ToSTBenchArguments(families=["resnet"])
    assert default.sparsities == [0.9, 0.95] and "regime" not in _settings(default, ModelArguments())
    with pytest.raises(ValueError, match="regime"):
        ToSTBenchArguments(regime="imagenet")
