"""The benchmark results committed under recipes/results (the README's ToST tables come from them) are what the
benchmark writes: their summary tables recompute from their rows, every mask reached its sparsity, and the "full"
rows were measured with the recipes `ToSTTrainingArguments` defaults to today (results of earlier recipes and of the
unfaithful technique forms sit in `recipes/results/superseded/`, checked for all but the recipe)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from hf_sparse.experiments.bench_tost import FAMILIES, check_technique, recipe_family, summarize
from hf_sparse.tost.arguments import FAMILY_RECIPES


RESULTS_FOLDER = Path(__file__).resolve().parents[1] / "recipes" / "results"
RESULTS = sorted(RESULTS_FOLDER.glob("bench_tost_*.json"))
SUPERSEDED = sorted((RESULTS_FOLDER / "superseded").glob("bench_tost_*.json"))


def test_results_are_committed():
    assert {path.name for path in RESULTS} >= {"bench_tost_sparse_vit.json", "bench_tost_resnet_cifar_like.json"}
    assert SUPERSEDED


@pytest.mark.parametrize("path", RESULTS + SUPERSEDED, ids=lambda path: f"{path.parent.name}/{path.name}")
def test_committed_tost_results_match_their_rows_and_todays_recipes(path):
    results = json.loads(path.read_text())
    rows = results["rows"]
    recipes = results["settings"]["recipes"]
    assert rows
    if path.parent == RESULTS_FOLDER and any(row["technique"] == "full" for row in rows):
        # the "full" rows ran with the recipe each family has today (a JSON records its own families' recipes only)
        assert recipes == {key: json.loads(json.dumps(FAMILY_RECIPES[key])) for key in recipes}
    assert {recipe_family(FAMILIES[row["family"]]) for row in rows} == set(recipes)
    for row in rows:
        check_technique(row["technique"])
        assert abs(row["mask_sparsity"] - row["sparsity"]) <= 0.005, row
        assert 0.0 < row["test_accuracy"] <= 1.0 and row["train_seconds"] > 0
    keys = [(row["family"], row["method"], row["sparsity"], row["technique"], row["seed"]) for row in rows]
    assert len(keys) == len(set(keys)), "a run appears twice"
    assert json.loads(json.dumps(summarize(rows, results["mask_seconds"]))) == results["table"]
