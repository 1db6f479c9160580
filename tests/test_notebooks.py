"""The attention guide (notebooks/*.ipynb) runs top to bottom in its quick setting, and says what it shows.

Each notebook is executed by nbclient in a fresh kernel with ``VITKIT_QUICK=1`` (less data, fewer
epochs) and ``VITKIT_NOTEBOOK_RESULTS`` pointing at a JSON file that its last cell writes: the key
numbers behind the notebook's claims, which are checked here. A notebook that runs but stops
showing what its text says (attention that no longer aligns, maps that no longer beat random) fails.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"
CELL_TIMEOUT = 600  # seconds per cell: generous, for a loaded 2-core machine


def run_notebook(name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict:
    """Execute notebooks/<name>.ipynb in quick mode (working directory ``tmp_path``); its results."""
    results = tmp_path / "results.json"
    monkeypatch.setenv("VITKIT_QUICK", "1")
    monkeypatch.setenv("VITKIT_NOTEBOOK_RESULTS", str(results))
    monkeypatch.setenv("TMPDIR", str(tmp_path))  # the kernel's tempfile folders, removed with tmp_path
    notebook = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
    client = nbclient.NotebookClient(
        notebook,
        timeout=CELL_TIMEOUT,
        kernel_name="python3",
        resources={"metadata": {"path": str(tmp_path)}},
    )
    client.execute()
    assert results.is_file(), f"{name} ran but its last cell wrote no results"
    return json.loads(results.read_text())


def check_attention_from_scratch(r: dict) -> None:
    assert r["soft_token_accuracy"] > 0.9 and r["soft_alignment_accuracy"] > 0.9
    assert r["reversal_token_accuracy"] > 0.9 and r["reversal_alignment_accuracy"] > 0.9
    assert r["vitkit_matches_scratch_max_abs_diff"] < 1e-5
    assert r["hard_rows_one_hot"]
    for estimator in ("straight-through", "Gumbel"):
        token, alignment = r[f"hard, {estimator}: token, alignment accuracy"]
        assert token > 0.9 and alignment > 0.9, estimator
    _, alignment = r["hard, no estimator: token, alignment accuracy"]
    assert alignment < 0.5, "the text says hard attention without an estimator does not learn to align"


def check_from_words_to_patches(r: dict) -> None:
    assert r["grid"] == [8, 8] and r["num_tokens"] == 65
    assert r["patch_embed_max_abs_diff"] < 1e-4
    assert r["equivariance_max_abs_diff"] < 1e-5
    assert r["forward_max_abs_diff"] < 1e-4
    assert r["attention_rows_sum_to_one"]
    assert r["val_accuracy"] > 0.3  # 5 classes: chance is 0.2


def check_training_on_cifar10(r: dict) -> None:
    assert r["dataset"] == "shapes"  # the quick setting never uses (or downloads) CIFAR-10
    assert r["val_acc1"] > r["chance"] + 0.05
    assert abs(r["val_accuracy_by_hand"] - r["val_acc1"]) < 0.01
    assert r["confusion_total"] == r["num_val"]


def check_finetuning(r: dict) -> None:
    assert r["pos_embed_shape_before"] == [1, 1 + 8 * 8, 64]
    assert r["pos_embed_shape_after"] == [1, 1 + 12 * 12, 64]
    assert r["grid_after"] == [12, 12] and r["num_classes_after"] == 5
    assert r["blocks_copied"]
    final = r["final_accuracy"]
    assert final["fine-tuned"] > final["from scratch"], final
    assert final["fine-tuned"] > 0.3, final


def check_explaining_predictions(r: dict) -> None:
    table, chance = r["table"], r["table"]["random"]
    for method in ("raw attention", "relevance"):
        scores = table[method]
        assert scores["deletion AUC ↓"] < chance["deletion AUC ↓"], method
        assert scores["insertion AUC ↑"] > chance["insertion AUC ↑"], method
        assert scores["pointing game ↑"] > chance["pointing game ↑"], method
        assert scores["mass in object ↑"] > chance["mass in object ↑"], method
    # attention-only maps cannot see the head; class-specific ones change when it is re-drawn
    assert r["randomization_head"]["rollout"] > 0.99
    assert r["randomization_head"]["relevance"] < 0.9


CHECKS = {
    "01_attention_from_scratch": check_attention_from_scratch,
    "02_from_words_to_patches": check_from_words_to_patches,
    "03_training_on_cifar10": check_training_on_cifar10,
    "04_finetuning": check_finetuning,
    "05_explaining_predictions": check_explaining_predictions,
}


def test_every_notebook_is_checked_and_stored_without_outputs():
    names = sorted(p.stem for p in NOTEBOOKS.glob("*.ipynb"))
    assert names == sorted(CHECKS), "add a check for every notebook in notebooks/"
    for name in names:
        notebook = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
        nbformat.validate(notebook)
        assert notebook.metadata["kernelspec"]["name"] == "python3", name
        code = [cell for cell in notebook.cells if cell.cell_type == "code"]
        assert all(not cell.outputs and cell.execution_count is None for cell in code), (
            f"{name} is stored with outputs; clear them before committing"
        )
        assert "VITKIT_QUICK" in code[0].source and "VITKIT_NOTEBOOK_RESULTS" in code[0].source, name


# The two longest notebooks (two minutes each on a slow 2-core host, about half the default run's
# time there) run with `pytest -m slow`; the others in every run.
SLOW = {"04_finetuning", "05_explaining_predictions"}


@pytest.mark.notebooks
@pytest.mark.parametrize(
    "name", [pytest.param(n, marks=pytest.mark.slow) if n in SLOW else n for n in sorted(CHECKS)]
)
def test_notebook_runs_in_quick_mode_and_shows_what_it_says(name, tmp_path, monkeypatch):
    CHECKS[name](run_notebook(name, tmp_path, monkeypatch))
