"""The experiments' pictures: accuracy against wall-clock, the patches a SparseViT keeps, and ToST's paired deltas."""

from __future__ import annotations

import numpy as np
import torch


def plot_accuracy_against_time(results, path: str, title: str, num_classes: int = 10) -> None:
    """Test accuracy against training wall-clock, one line per run (chance level at 0 s)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6, 4))
    for result in results:
        seconds = [0.0] + [point["train_seconds"] for point in result.curve]
        accuracy = [100.0 / num_classes] + [100 * point["accuracy"] for point in result.curve]  # chance before training
        axis.plot(seconds, accuracy, marker="o", label=result.name)
    axis.set_xlabel("training wall-clock (s, evaluation excluded)")
    axis.set_ylabel("test accuracy (%)")
    axis.set_title(title)
    axis.grid(alpha=0.3)
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def plot_kept_patches(model, data, path: str, num_images: int = 6) -> None:
    """Show which patches survive the last pruning layer (the rest are greyed out)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    model.eval()
    num_images = min(num_images, len(data.eval))
    batch = data.eval[:num_images]
    with torch.no_grad():
        outputs = model(pixel_values=batch["pixel_values"].to(model.device))
    config = model.config
    grid = data.image_size // config.patch_size
    figure, axes = plt.subplots(2, num_images, figsize=(1.8 * num_images, 4.6))
    images = batch["pixel_values"].cpu().numpy()
    kept = outputs.kept_patch_indices[-1].cpu().numpy() if outputs.kept_patch_indices else None
    for column in range(num_images):
        image = images[column].mean(axis=0)
        image = (image - image.min()) / max(float(image.max() - image.min()), 1e-6)
        axes[0, column].imshow(image, cmap="gray", vmin=0, vmax=1)
        axes[0, column].set_title(data.label_names[int(batch["labels"][column])], fontsize=8)
        dropped = np.ones((grid, grid), dtype=bool)
        if kept is not None:
            dropped.flat[kept[column]] = False
        else:
            dropped[:] = False
        dropped = np.kron(dropped, np.ones((config.patch_size, config.patch_size), dtype=bool))
        overlay = np.repeat(image[:, :, None], 3, axis=2)
        overlay[dropped] = 0.35 * overlay[dropped] + 0.65 * np.array([0.85, 0.1, 0.1])  # dropped: red
        axes[1, column].imshow(overlay)
        kept_count = grid * grid if kept is None else len(kept[column])
        axes[1, column].set_title(f"kept {kept_count}/{grid * grid}", fontsize=8)
        for row in range(2):
            axes[row, column].axis("off")
    figure.suptitle("Patches kept after the last pruning layer (dropped in red)")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def plot_pareto(points: list[dict], path: str, title: str) -> None:
    """Accuracy against training wall-clock: dense runs at several budgets joined as the dense frontier, every
    Tri-Level setting as a labelled point (up and to the left of the line is better than dense)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 4.5))
    dense = sorted((p for p in points if p["kind"] == "dense"), key=lambda p: p["seconds"])
    axis.plot([p["seconds"] for p in dense], [100 * p["accuracy"] for p in dense], "o-", color="0.4",
              label="dense ViT at several budgets")
    for point in (p for p in points if p["kind"] != "dense"):
        axis.plot(point["seconds"], 100 * point["accuracy"], "s", markersize=7)
        axis.annotate(point["label"], (point["seconds"], 100 * point["accuracy"]), textcoords="offset points",
                      xytext=(5, 4), fontsize=7)
    axis.set_xlabel("training wall-clock (s, evaluation excluded)")
    axis.set_ylabel("test accuracy (%)")
    axis.set_title(title, fontsize=9)
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8, loc="lower right")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def plot_paired_deltas(summary: list[dict], path: str, title: str) -> None:
    """`bench tost`: each variant's accuracy change against vanilla on the same mask and seed, one column per
    (mask, sparsity): a dot per seed and a bar at their mean (above zero: the variant won that pair)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    variants = list(dict.fromkeys(row["technique"] for row in summary
                                  if row["deltas"] and row["technique"] != "vanilla"))
    cells = list(dict.fromkeys((row["method"], row["sparsity"]) for row in summary))
    figure, axis = plt.subplots(figsize=(max(6.0, 0.9 * len(cells) + 2), 4.5))
    width = 0.8 / max(1, len(variants))
    for number, variant in enumerate(variants):
        rows = {(row["method"], row["sparsity"]): row for row in summary if row["technique"] == variant}
        positions = [index - 0.4 + width * (number + 0.5) for index, cell in enumerate(cells) if cell in rows]
        means = [rows[cell]["accuracy_delta_points"] for cell in cells if cell in rows]
        bars = axis.bar(positions, means, width=width * 0.9, alpha=0.45, label=variant)
        for position, cell in zip(positions, (cell for cell in cells if cell in rows)):
            deltas = rows[cell]["deltas"]
            axis.plot([position] * len(deltas), deltas, "o", markersize=3, color=bars.patches[0].get_facecolor()[:3])
    axis.axhline(0.0, color="0.3", linewidth=0.8)
    axis.set_xticks(range(len(cells)), [f"{method}\n{sparsity:g}" for method, sparsity in cells], fontsize=7)
    axis.set_ylabel("test accuracy change vs vanilla (points)")
    axis.set_title(title, fontsize=9)
    axis.grid(alpha=0.3, axis="y")
    axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


@torch.no_grad()
def kept_patches_on_object(model, data, num_images: int = 512, threshold: float = 0.1) -> dict[str, float]:
    """How well token pruning finds the object: the fraction of all patches that lie on it (mean brightness, in
    [0, 1], above `threshold`; Fashion-MNIST's background is black) and the fraction of the patches kept after each
    pruning layer that do. A score no better than chance keeps the first fraction."""
    model.eval()
    batch = data.eval[: min(num_images, len(data.eval))]
    pixels = batch["pixel_values"]
    mean = torch.tensor(data.mean).view(1, -1, 1, 1)
    std = torch.tensor(data.std).view(1, -1, 1, 1)
    brightness = (pixels * std + mean).mean(dim=1, keepdim=True)  # (batch, 1, H, W) in [0, 1]
    patch = model.config.patch_size
    on_object = (torch.nn.functional.avg_pool2d(brightness, patch).flatten(1) > threshold)  # (batch, patches)
    outputs = model(pixel_values=pixels.to(model.device))
    result = {"all_patches": float(on_object.float().mean())}
    for layer, kept in zip(model.config.token_pruning_layers, outputs.kept_patch_indices or ()):
        result[f"kept_after_layer_{layer}"] = float(on_object.gather(1, kept.cpu()).float().mean())
    return result
