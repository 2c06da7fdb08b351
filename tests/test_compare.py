"""`metarec-dist compare`: several methods over seeds, each a full training run, one table and plot."""

import json

import yaml
from conftest import write_config

from metarec_dist.cli import main, top_level_parts


def test_compare_trains_every_method_and_seed_and_summarises_the_test_metrics(synthetic_store, tmp_path, capsys):
    config = write_config(tmp_path, synthetic_store)
    code = main(["compare", str(config), "--methods", "target_only", "metarec", "--seeds", "0", "1",
                 "--method-set", "metarec:meta.temperature=0.5",
                 "--variant", "target_only_small_batch:method=target_only,train.batch_size=8"])
    assert code == 0
    out = capsys.readouterr().out
    [directory] = (tmp_path / "runs").iterdir()
    comparison = json.loads((directory / "comparison.json").read_text())
    assert [row["method"] for row in comparison["table"]] == ["target_only", "metarec", "target_only_small_batch"]
    assert {(run["label"], run["seed"]) for run in comparison["runs"]} == {
        (label, seed) for label in ("target_only", "metarec", "target_only_small_batch") for seed in (0, 1)}
    for run in comparison["runs"]:  # every run is a complete run directory of its own
        results = json.loads((directory / run["run"] / "results.json").read_text())
        assert results["test"] == run["results"]["test"] and results["seed"] == run["seed"]
        assert (directory / run["run"] / "model.pt").is_file()
    metarec = [run for run in comparison["runs"] if run["label"] == "metarec"]
    assert all((directory / run["run"] / "config.yaml").read_text().count("temperature: 0.5") == 1 for run in metarec)
    ndcg = {row["method"]: row["NDCG@10"] for row in comparison["table"]}
    best = max(ndcg, key=lambda method: ndcg[method]["mean"])
    assert [method for method in ndcg if ndcg[method]["best"]] == [best]
    values = [run["results"]["test"]["NDCG@10"] for run in comparison["runs"] if run["label"] == "target_only"]
    assert ndcg["target_only"]["values"] == values and ndcg["target_only"]["std"] > 0
    assert (directory / "comparison.png").stat().st_size > 0
    assert f"{ndcg[best]['mean']:.4f} ± {ndcg[best]['std']:.4f} *" in out


def test_compare_refuses_a_bad_method_override_before_anything_is_written(synthetic_store, tmp_path, capsys):
    config = write_config(tmp_path, synthetic_store)
    assert main(["compare", str(config), "--methods", "target_only", "--method-set", "metarec:train.steps=5"]) == 2
    assert "--method-set metarec:train.steps=5" in capsys.readouterr().err
    assert main(["compare", str(config), "--methods", "target_only", "--set", "train.steps=0"]) == 2
    assert "train.steps" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


def tune_directory(path, config, method, settings, trials):
    """What `metarec-dist tune` leaves: tune.json (every trial, the best) and best.yaml."""
    path.mkdir()
    best = yaml.safe_load(config.read_text())
    for key, value in settings.items():
        section, name = key.split(".")
        best[section][name] = value
    (path / "best.yaml").write_text(yaml.safe_dump({**best, "method": method}))
    rows = [{"settings": settings, "best_valid": 0.1}] * trials
    (path / "tune.json").write_text(json.dumps({"method": method, "overrides": [], "trials": rows, "best": rows[0]}))
    return path


def test_compare_runs_a_tuned_method_with_its_best_settings_and_warns_of_unequal_budgets(
        synthetic_store, tmp_path, capsys):
    config = write_config(tmp_path, synthetic_store)
    tuned = tune_directory(tmp_path / "tuned", config, "metarec",
                           {"train.learning_rate": 0.004, "meta.temperature": 0.5}, trials=3)
    assert main(["compare", str(config), "--methods", "target_only", "metarec", "--seeds", "0",
                 "--tuned", str(tuned)]) == 0
    assert "not tuned with equal budgets (trials: metarec 3, target_only 0)" in capsys.readouterr().err
    [directory] = (tmp_path / "runs").iterdir()
    comparison = json.loads((directory / "comparison.json").read_text())
    assert comparison["tuned"]["metarec"]["trials"] == 3
    trained = yaml.safe_load((directory / "metarec-seed0" / "config.yaml").read_text())
    assert trained["train"]["learning_rate"] == 0.004 and trained["meta"]["temperature"] == 0.5
    untuned = yaml.safe_load((directory / "target_only-seed0" / "config.yaml").read_text())
    assert untuned["train"]["learning_rate"] == 0.003  # the config's


def test_compare_refuses_settings_tuned_on_other_data_before_anything_is_written(synthetic_store, tmp_path, capsys):
    config = write_config(tmp_path, synthetic_store)
    tuned = tune_directory(tmp_path / "tuned", config, "metarec", {"data.target": "syn-related-0"}, trials=1)
    assert main(["compare", str(config), "--methods", "metarec", "--tuned", str(tuned)]) == 2
    assert f"--tuned {tuned}: tuned on" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


def results(method, valid, target="syn-target", fraction=0.5):
    return {"method": method, "target": target, "limited_target_fraction": fraction, "selection_metric": "NDCG@10",
            "validation": {"NDCG@10": valid}}


def test_the_negative_transfer_warning_fires_only_when_target_only_validates_better():
    from metarec_dist.report.comparison import negative_transfer_warnings
    from metarec_dist.report.summary import negative_transfer_warning, reference_problem

    warning = negative_transfer_warning(results("metarec", 0.09), results("target_only", 0.11))
    assert warning.startswith("negative transfer") and "0.1100 against 0.0900" in warning
    assert negative_transfer_warning(results("metarec", 0.12), results("target_only", 0.11)) is None
    assert "target_only" in reference_problem(results("metarec", 0.1), results("joint", 0.1))
    other_fraction = results("target_only", 0.1, fraction=1.0)
    assert "limited_target_fraction" in reference_problem(results("metarec", 0.1), other_fraction)
    records = [{"label": label, "results": results(method, value)} for label, method, value in
               [("target_only", "target_only", 0.11), ("target_only", "target_only", 0.13),
                ("metarec", "metarec", 0.115), ("joint", "joint", 0.1), ("joint", "joint", 0.2)]]
    [only] = negative_transfer_warnings(records)  # target-only's mean 0.12: above metarec, below joint's 0.15
    assert "than metarec" in only and "0.1200 against 0.1150" in only


def test_train_with_a_reference_records_whether_transfer_helped(synthetic_store, tmp_path, capsys):
    config = write_config(tmp_path, synthetic_store)
    assert main(["train", str(config), "--set", "method=target_only"]) == 0
    [reference] = (tmp_path / "runs").iterdir()
    assert main(["train", str(config), "--reference", str(reference)]) == 0
    out = capsys.readouterr().out
    [run] = [path for path in (tmp_path / "runs").iterdir() if path != reference]
    ours = json.loads((run / "results.json").read_text())
    theirs = json.loads((reference / "results.json").read_text())
    worse = theirs["validation"]["NDCG@10"] > ours["validation"]["NDCG@10"]
    assert ours["reference"]["negative_transfer"] == worse and ("negative transfer" in out) == worse
    assert main(["train", str(config), "--reference", str(run)]) == 2  # a metarec run is no reference
    assert "not target_only" in capsys.readouterr().err


def test_a_variant_may_set_a_list_whose_commas_are_not_separators():
    assert top_level_parts("method=uniform,data.sources=[a, b,c],model.vq={kind: product, codewords: 8}") == [
        "method=uniform", "data.sources=[a, b,c]", "model.vq={kind: product, codewords: 8}"]
    assert top_level_parts("train.steps=5") == ["train.steps=5"]
