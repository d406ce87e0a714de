"""The experiments' pictures: accuracy against wall-clock, and the patches a SparseViT keeps."""

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
