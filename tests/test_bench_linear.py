"""``loraopt bench linear``: output schema of a quick run, the task construction of spec §7.1 and the synthetic
checks of spec §11 (seed 0, deterministic mode, float64)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from torch import nn

from loraopt_bench import linear
from loraopt_bench.report import CurveBand, markdown_table, plot_curve_bands
from loraopt.cli import main as cli_main

REQUIRED_KEYS = {"epoch", "excess_loss_mean", "excess_loss_std", "lr", "seconds"}


def test_quick_run_writes_results_schema_figures_and_summary(tmp_path):
    assert cli_main(["bench", "linear", "--quick", "--no-progress", "--out", str(tmp_path)]) == 0

    results = json.loads((tmp_path / "results.json").read_text())
    assert set(results) == set(linear.MODES)
    for mode, records in results.items():
        assert list(records) == list(linear.DEFAULT_METHODS[mode])
        starts = []
        for method, record in records.items():
            assert REQUIRED_KEYS <= set(record), (mode, method)
            assert record["epoch"] == [0, 1, 2, 3]
            assert len(record["excess_loss_mean"]) == len(record["excess_loss_std"]) == 4
            assert all(math.isfinite(v) for v in record["excess_loss_mean"] + record["excess_loss_std"])
            assert record["lr"] > 0 and record["seconds"] >= 0
            starts.append(record["excess_loss_mean"][0])
        # Epoch 0 is the shared SVD initialisation, the same for every method.
        assert max(starts) - min(starts) <= 1e-9 * max(starts)
        assert (tmp_path / f"excess_loss_{mode}.png").stat().st_size > 0
    assert records["scaled-psi"]["hyperparameters"]["loss_reduction"] == "sum"
    summary = (tmp_path / "summary.md").read_text()
    assert "## Deterministic mode" in summary and "## Stochastic mode" in summary


def test_model_is_zeroed_frozen_base_plus_truncated_svd_of_the_seeds_default_init():
    model = linear.build_lora_model(3, torch.float64)
    layer = model.base_model.model.linear
    assert layer.scaling["default"] == 1.0
    assert not layer.base_layer.weight.requires_grad
    assert torch.count_nonzero(layer.base_layer.weight) == 0

    torch.manual_seed(3)
    w_init = nn.Linear(linear.D_IN, linear.D_OUT, bias=False).weight.detach().double()
    u, s, vh = torch.linalg.svd(w_init, full_matrices=False)
    expected = (u[:, :8] * s[:8]) @ vh[:8]
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    torch.testing.assert_close(B @ A, expected, rtol=0, atol=1e-12)
    # Balanced factors: B = U Σ^½, A = Σ^½ Vᵀ.
    torch.testing.assert_close(A @ A.mT, torch.diag(s[:8]), rtol=0, atol=1e-12)
    torch.testing.assert_close(B.mT @ B, torch.diag(s[:8]), rtol=0, atol=1e-12)


def test_task_targets_and_f_star():
    task = linear.make_task(0)
    torch.manual_seed(0)
    w_star = torch.randn(200, 600).double()
    torch.testing.assert_close(task.targets, w_star, rtol=0, atol=0)
    assert torch.equal(task.inputs, torch.eye(200, dtype=torch.float64))
    sigma = np.linalg.svd(w_star.numpy(), compute_uv=False)  # an independent reference
    assert task.f_star == pytest.approx(float(np.square(sigma[8:]).sum()), rel=1e-12)


def test_unknown_method_is_rejected_before_running():
    with pytest.raises(ValueError, match="unknown method"):
        linear.run_linear(["deterministic"], ["psi-8"], [0], 1, progress=False)
    assert linear.method_config("psi-x8-rm2", "stochastic")[1]["rank_mult"] == 2.0


def test_svdlora_reaches_the_rank_8_optimum_after_one_step():
    """Spec §11: at η = 0.5 the full step lands on W★ᵀ, so its projection is Π_8(W★ᵀ): excess/f★ < 1e-9."""
    results = linear.run_linear(["deterministic"], ["svdlora"], [0], 1, progress=False)
    record = results["deterministic"]["svdlora"]
    assert record["lr"] == 0.5
    excess, f_star = record["excess_loss_per_seed"][0][1], record["f_star"][0]
    assert abs(excess) / f_star < 1e-9
    assert record["excess_loss_per_seed"][0][0] / f_star > 0.05  # it did start far from the optimum


@pytest.fixture(scope="module")
def psi_deterministic_seed0():
    # ~10 s on one thread: PSI ×1, ×2, ×8, ×32 for 100 full-batch epochs.
    results = linear.run_linear(
        ["deterministic"], ["psi-x1", "psi-x2", "psi-x8", "psi-x32"], [0], 100, progress=False
    )
    return results["deterministic"]


@pytest.mark.parametrize("epoch", [1, 10, 100])
def test_psi_excess_loss_is_non_increasing_in_inner_rounds(psi_deterministic_seed0, epoch):
    """Spec §11: ×8 ≤ ×2 ≤ ×1 at epochs 1, 10 and 100 (seed 0, deterministic)."""
    excess = {m: psi_deterministic_seed0[m]["excess_loss_per_seed"][0][epoch] for m in ("psi-x1", "psi-x2", "psi-x8")}
    assert excess["psi-x8"] <= excess["psi-x2"] <= excess["psi-x1"], excess


def test_psi_x32_reaches_the_rank_8_optimum_within_100_epochs(psi_deterministic_seed0):
    record = psi_deterministic_seed0["psi-x32"]
    curve = np.asarray(record["excess_loss_per_seed"][0])
    assert np.min(np.abs(curve[1:])) / record["f_star"][0] < 1e-9


def test_report_helpers_handle_zero_negative_and_diverged_values(tmp_path):
    curves = {
        "a": CurveBand([0, 1, 2], [1.0, 0.0, -1e-12], [0.1, 0.0, 0.0]),
        "b": CurveBand([0, 1, 2], [1.0, float("nan"), float("inf")], [0.0, 0.0, 0.0]),
    }
    path = plot_curve_bands(curves, tmp_path / "curves.png", floor=1e-11, floor_label="zero")
    assert path.stat().st_size > 0
    table = markdown_table(["name", "value"], [["x", 1], ["y|z", 2]])
    assert table.splitlines()[1] == "| :--- | ---: |"
    assert "y\\|z" in table
    with pytest.raises(ValueError):
        markdown_table(["a", "b"], [[1]])
