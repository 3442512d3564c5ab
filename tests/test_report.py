"""Issue 5: experiments (many seeds, resumable) and reports (charts and tables)."""

from __future__ import annotations

import json

import pytest
from PIL import Image
from test_train import tiny_data

from cifarcnn.cli import main
from cifarcnn.config import TrainConfig
from cifarcnn.errors import CifarError
from cifarcnn.experiment import results_table, run_experiment
from cifarcnn.report import build_report
from cifarcnn.train import train

CFG = dict(epochs=2, batch_size=64)


@pytest.fixture(scope="module")
def data():
    return tiny_data(192, 100)


@pytest.fixture(scope="module")
def exp_and_run(tmp_path_factory, data):
    root = tmp_path_factory.mktemp("rep")
    run_experiment(TrainConfig(**CFG), 2, root / "exp-cnn", data=data, quiet=True)
    train(TrainConfig(model="paper-mlp", **CFG, out=str(root / "run-mlp")), data=data,
          quiet=True)
    return root / "exp-cnn", root / "run-mlp"


def test_experiment_table_and_skipping_finished_runs(tmp_path, data, capsys):
    exp = tmp_path / "exp"
    run_experiment(TrainConfig(**CFG), 1, exp, data=data, quiet=True)
    first = (exp / "seed-0" / "summary.json").stat().st_mtime_ns
    capsys.readouterr()
    rows = run_experiment(TrainConfig(**CFG), 3, exp, data=data)  # continue to 3 runs
    out = capsys.readouterr().out
    assert "run 1/3 (seed 0): finished earlier, skipped" in out
    assert (exp / "seed-0" / "summary.json").stat().st_mtime_ns == first
    assert [r["seed"] for r in rows] == [0, 1, 2]
    table = results_table(exp)
    assert table.count("| seed-") == 3
    for needle in ("mean ± std", "| min |", "| max |", "best val accuracy", "seconds"):
        assert needle in table


def test_experiment_from_another_first_seed_adds_to_the_same_folder(tmp_path, data, capsys):
    """--seed S trains seeds S..S+R-1: a confirming benchmark on new seeds, added to the
    folder of the first one, whose table then counts every seed asked for."""
    exp = tmp_path / "exp"
    run_experiment(TrainConfig(**CFG), 2, exp, data=data, quiet=True)
    capsys.readouterr()
    rows = run_experiment(TrainConfig(**CFG, seed=3), 2, exp, data=data)
    out = capsys.readouterr().out
    assert "run 1/2 (seed 3)" in out and "run 2/2 (seed 4)" in out
    assert [r["seed"] for r in rows] == [3, 4]  # only the runs asked for now
    assert sorted(p.name for p in exp.glob("seed-*")) == ["seed-0", "seed-1", "seed-3", "seed-4"]
    assert json.loads((exp / "experiment.json").read_text())["seeds"] == [0, 1, 3, 4]
    assert "4 of 4 runs finished" in results_table(exp)
    # asking again for fewer seeds forgets none of them
    assert len(run_experiment(TrainConfig(**CFG), 1, exp, data=data, quiet=True)) == 1
    assert "4 of 4 runs finished" in results_table(exp)
    with pytest.raises(CifarError, match="--seed -1"):
        run_experiment(TrainConfig(**CFG, seed=-1), 1, tmp_path / "neg", data=data)
    assert not (tmp_path / "neg").exists()  # refused before the folder was written


def test_interrupted_run_of_an_experiment_is_resumed(tmp_path, data):
    exp = tmp_path / "exp"
    run_experiment(TrainConfig(**CFG), 2, exp, data=data, quiet=True)
    before = (exp / "seed-0" / "weights.safetensors").read_bytes()
    (exp / "seed-1" / "summary.json").unlink()  # as if killed after its last checkpoint
    rows = run_experiment(TrainConfig(**CFG), 2, exp, data=data, quiet=True)
    assert len(rows) == 2 and rows[1]["resumed"] is True
    assert (exp / "seed-0" / "weights.safetensors").read_bytes() == before


def test_experiment_with_other_settings_is_refused(tmp_path, data):
    run_experiment(TrainConfig(**CFG), 1, tmp_path / "e", data=data, quiet=True)
    with pytest.raises(Exception, match="other settings"):
        run_experiment(TrainConfig(epochs=3, batch_size=64), 1, tmp_path / "e", data=data,
                       quiet=True)


def test_experiment_recorded_before_a_setting_existed_is_continued(tmp_path, data):
    run_experiment(TrainConfig(**CFG), 1, tmp_path / "e", data=data, quiet=True)
    meta = tmp_path / "e" / "experiment.json"
    spec = json.loads(meta.read_text())
    for key in ("select_fraction", "select_from_epoch"):  # added in a later version
        del spec["config"][key]
    meta.write_text(json.dumps(spec))
    assert len(run_experiment(TrainConfig(**CFG), 1, tmp_path / "e", data=data,
                              quiet=True)) == 1
    with pytest.raises(Exception, match="select_fraction"):
        run_experiment(TrainConfig(**CFG, select_fraction=0.5), 1, tmp_path / "e", data=data,
                       quiet=True)


def test_report_has_every_chart_and_table(exp_and_run, data, tmp_path):
    exp, run = exp_and_run
    page = build_report([exp, run], tmp_path / "report", data=data)
    out = tmp_path / "report"
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert pngs == sorted(["compare.png", "curves-exp-cnn.png", "curves-run-mlp.png",
                           "confusion-exp-cnn.png", "confusion-run-mlp.png",
                           "mistakes-exp-cnn.png", "mistakes-run-mlp.png",
                           "calibration-exp-cnn.png", "calibration-run-mlp.png"])
    for name in pngs:
        with Image.open(out / name) as im:
            im.verify()
        with Image.open(out / name) as im:
            assert im.format == "PNG" and im.width >= 800 and im.height >= 400, (name, im.size)
    text = page.read_text()
    assert text.count("data:image/png;base64,") == len(pngs)
    assert "<table>" in text and "mean" in text
    md = (out / "report.md").read_text()
    assert all(f"({name})" in md for name in pngs)
    assert "| exp-cnn | paper-cnn | 2 |" in md and "| run-mlp | paper-mlp | 1 |" in md


def test_report_shows_the_modes_table(exp_and_run, data, tmp_path):
    import json

    modes = tmp_path / "modes.json"
    modes.write_text(json.dumps({"rows": [
        {"device": "cpu", "mode": "eager", "epochs": 2, "runs": 1, "train_best_s": 1.0,
         "train_worst_s": 1.2, "setup_s": 0.0, "images_per_second": 1000.0,
         "latency_p50_ms": 0.5, "latency_p99_ms": 0.9}]}))
    build_report([exp_and_run[1]], tmp_path / "r", data=data, modes_json=modes)
    assert "| cpu | eager | 2 | 1 | 1.0 | 1.2 | 0.0 | 1,000 |" in \
        (tmp_path / "r" / "report.md").read_text()


@pytest.mark.parametrize(("text", "says"), [
    ("not json", "Expecting value"), ('{"rows": [{"device": "cpu"}]}', "no 'mode'"),
    ('{"rows": 3}', "not iterable"), ("[]", "list indices")])
def test_a_bad_modes_file_is_refused_before_anything_is_written(exp_and_run, tmp_path, text,
                                                               says):
    modes = tmp_path / "modes.json"
    modes.write_text(text)
    with pytest.raises(CifarError, match=f"--modes {modes}: not a `bench modes`.*{says}"):
        # data=None: were the modes read late, the report would first look for CIFAR-10
        build_report([exp_and_run[1]], tmp_path / "r", modes_json=modes)
    assert not (tmp_path / "r").exists()


def test_not_a_run_is_a_clear_error(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main(["report", str(tmp_path / "empty"), "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "neither a run folder" in err[0]
    assert main(["results", str(tmp_path / "empty")]) == 2
    assert "not an experiment folder" in capsys.readouterr().err


@pytest.mark.parametrize(("name", "text", "says"), [
    ("summary.json", "{", "summary.json: unreadable"),
    ("summary.json", "[1]", "summary.json: not a JSON object"),
    ("summary.json", '{"model": "paper-mlp"}', "summary.json: no 'epochs' field"),
    ("summary.json", '{"model": "paper-mlp", "epochs": 2, "train_accuracy": 0.5, "val_accuracy": '
     '"high", "best_val_accuracy": 0.5, "train_seconds": 1}',
     """'val_accuracy' is "high", not a number"""),
    ("metrics.jsonl", "{\n", "metrics.jsonl, line 1: not JSON"),
    ("metrics.jsonl", '{"epoch": 1}\n', "metrics.jsonl, line 1: 'train_loss' is missing"),
    ("metrics.jsonl", "[]\n", "metrics.jsonl, line 1: 'train_loss' is missing"),
    ("metrics.jsonl", "", "metrics.jsonl: no epoch finished yet")])
def test_report_of_a_damaged_run_is_one_line(exp_and_run, tmp_path, capsys, name, text, says):
    """Each of these raised a JSONDecodeError, KeyError, IndexError or TypeError."""
    import shutil

    run = tmp_path / "run"
    shutil.copytree(exp_and_run[1], run)
    (run / name).write_text(text)
    assert main(["report", str(run), "--out", str(tmp_path / "r")]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and says in err[0], err


@pytest.mark.parametrize(("name", "text", "says"), [
    ("experiment.json", "{", "experiment.json: unreadable"),
    ("experiment.json", '{"model": "paper-cnn"}', "experiment.json: no 'runs' field"),
    ("seed-0/summary.json", '{"epochs": "two"}', "summary.json: 'epochs' is \"two\""),
    ("seed-1/summary.json", "", "summary.json: unreadable")])
def test_results_of_a_damaged_experiment_is_one_line(exp_and_run, tmp_path, capsys, name, text,
                                                     says):
    import shutil

    exp = tmp_path / "exp"
    shutil.copytree(exp_and_run[0], exp)
    (exp / name).write_text(text)
    assert main(["results", str(exp)]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and says in err[0], err


def test_tensorboard_event_files(tmp_path, data):
    run = tmp_path / "r"
    train(TrainConfig(**CFG, tensorboard=True, out=str(run)), data=data, quiet=True)
    events = list((run / "tensorboard").glob("events.out.tfevents.*"))
    assert len(events) == 1 and events[0].stat().st_size > 100
