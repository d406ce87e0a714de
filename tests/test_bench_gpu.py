"""`hf-sparse bench gpu` end to end on CPU: the tiny geometry, eager and compiled (`aot_eager`), one JSON.

These check what the benchmark writes and that its ratios come from its own measurements, never how fast anything
was. On CPU the compiled mode runs two variants only (HF ViT and the one with attention sparsity): each compile
costs several seconds here.
"""

from __future__ import annotations

import json
import statistics

import pytest
import torch

from hf_sparse.cli import main as cli_main

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU geometry; on CUDA it runs DeiT-S/ViT-B")


def run(tmp_path, *flags: str) -> dict:
    path = tmp_path / "bench_gpu.json"
    cli_main(["bench", "gpu", "--output", str(path), "--rounds", "2", "--warmup", "1", *flags])
    return json.loads(path.read_text())


def test_bench_gpu_on_cpu_writes_one_json_with_ratios_from_its_measurements(tmp_path, capsys):
    result = run(tmp_path, "--modes", "eager")
    assert list(tmp_path.iterdir()) == [tmp_path / "bench_gpu.json"]
    assert (result["device"], result["device_type"]) == ("cpu", "cpu")
    assert result["settings"]["geometries"] == ["tiny"] and result["settings"]["batch_size"] == 8
    assert result["geometries"]["tiny"]["tokens"] == 17 and result["settings"]["autocast"] == "bf16"
    assert [(block["geometry"], block["mode"]) for block in result["blocks"]] == [("tiny", "eager")]
    assert result["skipped"] == []
    rows = {row["variant"]: row for row in result["blocks"][0]["rows"]}
    assert list(rows) == ["hf_vit", "token_0.7", "token_0.5", "token_0.7_attn_0.5"]
    # attention sparsity runs SDPA without CUDA (flex has no CPU backward); FlexAttention on CUDA
    assert {name: row["attn_implementation"] for name, row in rows.items()} == dict.fromkeys(rows, "sdpa")
    reference = rows["hf_vit"]["train_seconds_per_round"]
    for row in rows.values():
        own = row["train_seconds_per_round"]
        assert len(own) == result["blocks"][0]["rounds"] == 2
        ratios = [hf / mine for hf, mine in zip(reference, own)]
        assert row["train_ratios_per_round"] == pytest.approx(ratios)
        assert row["train_ratio"] == pytest.approx(statistics.median(ratios))
        assert row["train_images_per_s"] == pytest.approx(8 / statistics.median(own))
        assert row["peak_memory_bytes"] is None and row["peak_memory_ratio"] is None  # CUDA only
    assert rows["hf_vit"]["train_ratio"] == 1.0

    kept = result["kept_set_check"]
    assert kept["ran"] and len(kept["kept_overlap_per_pruning_layer"]) == len(kept["pruning_layers"])
    # scores in float32 under bf16 autocast: the first pruning layer (same inputs) keeps float32's tokens
    assert kept["kept_overlap_per_pruning_layer"][0] >= 0.99
    sync = result["sync_check"]
    assert sync["ran"], sync.get("error")
    assert sync["forward_backward_windows"] == 6  # 2 epochs x 3 steps of the short TriLevelTrainer run
    assert sync["host_copies_between_forward_and_backward"] == 0 and sync["host_copy_calls"] == {}
    assert sync["cuda_syncs_between_forward_and_backward"] is None  # CPU
    assert "x HF ViT" in capsys.readouterr().out


def test_bench_gpu_compiled_mode_runs_compiled_models(tmp_path, monkeypatch):
    compiled_with = []
    real_compile = torch.compile

    def recording_compile(model, **kwargs):
        compiled_with.append((type(model).__name__, kwargs.get("backend")))
        return real_compile(model, **kwargs)

    monkeypatch.setattr(torch, "compile", recording_compile)
    result = run(tmp_path, "--variants", "hf_vit", "token_0.7_attn_0.5", "--no_kept_set_check", "--no_sync_check")
    assert compiled_with == [("ViTForImageClassification", "aot_eager"),
                             ("SparseViTForImageClassification", "aot_eager")]
    assert result["settings"]["compile_backend"] == "aot_eager"
    assert [block["mode"] for block in result["blocks"]] == ["eager", "compiled"]
    compiled = {row["variant"]: row for row in result["blocks"][1]["rows"]}
    assert list(compiled) == ["hf_vit", "token_0.7_attn_0.5"]
    assert compiled["hf_vit"]["train_ratio"] == 1.0
    assert len(compiled["token_0.7_attn_0.5"]["train_ratios_per_round"]) == 2
    assert "kept_set_check" not in result and "sync_check" not in result


def test_bench_gpu_stops_at_max_seconds_and_says_what_it_skipped(tmp_path):
    result = run(tmp_path, "--max_seconds", "0", "--no_kept_set_check", "--no_sync_check")
    assert result["blocks"] == []
    assert result["skipped"] == [
        "tiny/eager: not started within max_seconds=0.0", "tiny/compiled: not started within max_seconds=0.0"
    ]


def test_bench_gpu_refuses_a_run_without_its_reference(tmp_path, capsys):
    with pytest.raises(SystemExit):
        run(tmp_path, "--variants", "token_0.7")
    assert "`variants`" in capsys.readouterr().err and not (tmp_path / "bench_gpu.json").exists()


def test_host_copy_counter_counts_only_inside_the_window():
    from hf_sparse.experiments.bench_gpu import HostCopyCounter

    values = torch.arange(3.0)
    with HostCopyCounter() as counter:
        values.sum().item()  # window closed: not counted
        counter.open_window()
        values.sum().item(), values.tolist(), bool(values[0]), values.to("cpu")  # on CPU `.to("cpu")` copies nothing
        counter.close_window()
        values.cpu()
    assert dict(counter.calls) == {".item()": 1, ".tolist()": 1, ".__bool__()": 1} and counter.windows == 1

    # On a CPU-only machine, a copy an accelerator would make: the host named as a string. `.to(device)` of the
    # tensor's own device is not one.
    with HostCopyCounter(explicit_host_targets=True) as counter:
        counter.open_window()
        values.to("cpu"), values.to(device="cpu"), values.to("cpu", torch.float64), values.cpu()
        values.to(values.device), values.to(torch.float64), values.to(values)
        counter.close_window()
    assert dict(counter.calls) == {".to()": 3, ".cpu()": 1}
