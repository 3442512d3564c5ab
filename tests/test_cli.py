"""The CLI as a user meets it: real subprocesses, one-line errors, no tracebacks."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from formats import python_archive
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]


def run(*args, env_extra=None, cwd=None, stdin=None):
    import os

    env = {**os.environ, **(env_extra or {})}
    return subprocess.run([sys.executable, "-m", "cifarcnn", *args], capture_output=True,
                          text=True, env=env, cwd=cwd, timeout=300, stdin=stdin)


def here(capsys, *args):
    """What `run` gives, from the CLI run in this process: without the 2-3 s a fresh
    interpreter takes to import torch and load the weights each time."""
    from cifarcnn.cli import main

    capsys.readouterr()
    try:
        code = main([str(a) for a in args])
    except SystemExit as e:  # argparse's own errors
        code = e.code
    out = capsys.readouterr()
    return subprocess.CompletedProcess(args, code, out.out, out.err)


def assert_one_line_error(r, *needles):
    assert r.returncode != 0
    assert "Traceback" not in r.stderr
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, r.stderr
    for n in needles:
        assert n in lines[0], lines[0]


def test_missing_data(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("CIFAR10_DATA", "")
    r = here(capsys, "train", "--out", str(tmp_path / "r"))
    assert_one_line_error(r, "--data", "$CIFAR10_DATA", "--download")
    r = here(capsys, "train", "--data", str(tmp_path / "nope"), "--out", str(tmp_path / "r"))
    assert_one_line_error(r, "nope", "no such file")


def test_unknown_model(tmp_path, capsys):
    r = here(capsys, "train", "--model", "vgg99", "--out", str(tmp_path / "r"))
    assert_one_line_error(r, "unknown model 'vgg99'")


def test_bad_resizing_flags(tmp_path, capsys):
    r = here(capsys, "train", "--model", "fast", "--downscale", "4", "--out", str(tmp_path / "r"))
    assert_one_line_error(r, "--downscale 4", "8 to 32 pixels")
    assert not (tmp_path / "r").exists()
    # the paper's nets end in fully connected layers sized for 32x32 inputs
    r = here(capsys, "train", "--model", "paper-cnn", "--low-res", "24", "--low-res-epochs", "1",
             "--out", str(tmp_path / "r"))
    assert_one_line_error(r, "paper-cnn takes 32x32 images only", "--model fast")
    assert not (tmp_path / "r").exists()


def test_counts_below_one_are_refused_before_any_work(tmp_path, capsys):
    from cifarcnn.cli import main

    for argv, needle in ((["predict", "--weights", "fast", "--top", "0", "x.png"], "--top 0"),
                         (["predict", "--weights", "fast", "--top", "-1", "x.png"], "--top -1"),
                         (["train", "--nproc", "0", "--out", str(tmp_path / "r")],
                          "--nproc 0: must be at least 1")):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and needle in err[0], err
    assert not (tmp_path / "r").exists()


def test_paths_that_cannot_take_the_results_stop_the_command_before_training(tmp_path,
                                                                             capsys):
    from cifarcnn.cli import main

    a_file = tmp_path / "file"
    a_file.write_text("kept")
    nowhere = tmp_path / "no" / "such" / "folder" / "out.json"
    # --data does not exist either: the output paths are checked first
    data = ["--data", str(tmp_path / "no-data")]
    for argv, needle in (
            (["bench", "time-to-accuracy", "--json", str(nowhere), *data],
             f"--json {nowhere}: the folder {nowhere.parent} does not exist"),
            (["bench", "time-to-accuracy", "--json", str(tmp_path), *data],
             f"--json {tmp_path}: is a folder"),
            (["bench", "time-to-accuracy", "--keep", str(a_file), *data],
             f"--keep {a_file}: exists and is not a folder"),
            (["bench", "modes", "--out", str(a_file), *data],
             f"--out {a_file}: exists and is not a folder"),
            (["experiment", "--out", str(a_file), *data],
             f"--out {a_file}: exists and is not an experiment folder")):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and needle in err[0], err
    assert a_file.read_text() == "kept"


def test_an_interrupted_benchmark_says_whether_it_can_be_continued(tmp_path, monkeypatch):
    from test_train import tiny_data

    from cifarcnn import experiment
    from cifarcnn.checkpoint import Interrupted
    from cifarcnn.errors import CifarError
    from cifarcnn.time_to_accuracy import time_to_accuracy

    def stopped(cfg, runs, root, **kw):
        raise Interrupted(15, f"SIGTERM: stopped at epoch 1, step 3; checkpoint written to "
                              f"{root}/seed-0/ckpt-last.pt. Continue with: cifarcnn train "
                              f"--resume {root}/seed-0")

    monkeypatch.setattr(experiment, "run_experiment", stopped)
    with pytest.raises(Interrupted) as e:  # a temporary folder: nothing to continue
        time_to_accuracy("paper-cnn", 1, data=tiny_data(20, 10), log=lambda m: None)
    assert e.value.exit_code == 143 and "--resume" not in str(e.value)
    assert str(e.value).startswith("SIGTERM: stopped; the runs were in a temporary folder")
    with pytest.raises(Interrupted, match="--resume") as e:  # a kept one: the usual hint
        time_to_accuracy("paper-cnn", 1, data=tiny_data(20, 10), keep=tmp_path / "k",
                         log=lambda m: None)
    assert isinstance(e.value, CifarError)


def test_folders_without_weights_and_bad_labels_are_named(tmp_path):
    import cifarcnn
    from cifarcnn.errors import CifarError

    with pytest.raises(CifarError, match=r"a folder without weights\.safetensors"):
        cifarcnn.load(tmp_path)
    (tmp_path / "ckpt-last.pt").write_bytes(b"")
    with pytest.raises(CifarError, match=f"unfinished run .*train --resume {tmp_path}"):
        cifarcnn.load(tmp_path)
    clf = cifarcnn.load("paper-cnn")
    images = np.zeros((2, 32, 32, 3), np.uint8)
    for labels in (np.array([0, 10]), np.array([0]), np.array([0.0, 1.0]), np.array([[0, 1]]),
                   np.array([-1, 0])):
        with pytest.raises(CifarError, match="labels must be whole numbers 0-9, one per image"):
            clf.evaluate(images, labels)
    assert clf.evaluate(images, np.array([3, 3]))["accuracy"] in (0.0, 0.5, 1.0)


def test_evaluate_counts_each_class_and_each_confusion():
    import cifarcnn
    from cifarcnn.cli import per_class_lines

    clf = cifarcnn.load("paper-cnn")
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (300, 32, 32, 3), dtype=np.uint8)
    labels = rng.integers(0, 9, 300)  # no truck: a class with no images
    r = clf.evaluate(images, labels)
    pred = clf.predict(images).argmax(1)
    m = np.array(r["confusion"])
    assert m.shape == (10, 10) and m.sum() == 300 and np.trace(m) == r["correct"]
    np.testing.assert_array_equal(m, np.histogram2d(labels, pred, bins=10,
                                                    range=[[0, 10], [0, 10]])[0])
    acc = r["per_class_accuracy"]
    assert list(acc) == clf.classes and acc["truck"] is None
    assert acc["cat"] == np.mean(pred[labels == 3] == 3)
    text = per_class_lines(r, clf.classes)
    assert f"cat {acc['cat']:.1%}" in text and "truck -" in text
    rates = sorted((m[t, p] / m[t].sum() for t in range(9) for p in range(10) if t != p),
                   reverse=True)
    mistakes = text.splitlines()[-1].removeprefix("most confused: ").split(", ")
    assert [float(x.split()[-1].rstrip("%")) for x in mistakes] == [
        round(100 * f, 1) for f in rates[:3]]
    # calibration: the gap between confidence and accuracy, bin by bin, as a numpy reference
    probs = clf.predict(images)
    conf, right = probs.max(1), probs.argmax(1) == labels
    bins = np.minimum((conf * 15).astype(int), 14)
    ece = sum(abs(conf[bins == b].sum() - right[bins == b].sum()) for b in range(15)) / 300
    c = r["calibration"]
    assert c["ece"] == pytest.approx(ece, abs=1e-5) and c["confidence"] == pytest.approx(
        conf.mean(), abs=1e-5)
    assert [b["images"] for b in c["bins"]] == np.bincount(bins, minlength=15).tolist()


def test_evaluate_on_a_test_folder_of_some_of_the_classes(tmp_path, capsys):
    """One's own labelled photos: test/<class>/ alone, any of the model's classes by name."""
    from formats import image_folder

    root = image_folder(tmp_path / "own", per_class=3, classes=("dog", "cat"))
    shutil.rmtree(root / "train")
    r = here(capsys, "evaluate", "--weights", "paper-cnn", "--data", root, "--json")
    assert r.returncode == 0, r.stderr
    m = np.array(json.loads(r.stdout)["confusion"])  # rows: the model's classes
    assert m.sum(1).tolist() == [0, 0, 0, 3, 0, 3, 0, 0, 0, 0]
    r = here(capsys, "evaluate", "--weights", "paper-cnn", "--data", root)
    assert "cat " in r.stdout and "airplane -" in r.stdout and "recorded" not in r.stdout
    assert_one_line_error(here(capsys, "train", "--data", root, "--out", tmp_path / "r"),
                          "no training images", "train/<class>/")
    # bad data stops a run before its first epoch: the folder it began is gone, so the
    # same command works once the data is fixed (it used to say "already holds a run")
    assert not (tmp_path / "r").exists()
    one = image_folder(tmp_path / "one", per_class=3, classes=("cat",))
    r = here(capsys, "train", "--data", one, "--out", tmp_path / "r")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "every training image is of one class, 'cat'" in r.stderr.splitlines()[-1]
    assert not (tmp_path / "r").exists()
    (root / "test" / "dog").rename(root / "test" / "puppy")
    r = here(capsys, "evaluate", "--weights", "paper-cnn", "--data", root)  # decoded anew
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "['puppy'] are not among the model's" in r.stderr.splitlines()[-1]


@pytest.mark.parametrize("model", ["paper-cnn", "fast"])
def test_models_shows_the_recipe_train_uses_and_the_arguments_it_takes(capsys, model):
    """`train --help` sends users to `cifarcnn models` for the recipe: the flags it prints
    must be the settings train resolves, and every --model-arg key it lists must build."""
    from cifarcnn.models import build_model, count_parameters

    r = here(capsys, "models", model)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].split()[0] == model and "params" in lines[0]
    recipe = " ".join(line[14:] for line in lines[1:lines.index(next(
        line for line in lines if line.startswith("  --model-arg")))]).split()
    plain = json.loads(here(capsys, "train", "--model", model, "--print-config").stdout)
    given = json.loads(here(capsys, "train", "--model", model, *recipe,
                            "--print-config").stdout)
    assert given == plain and len(recipe) >= 2 * 20  # flag-value pairs, all of them
    d = json.loads(here(capsys, "models", model, "--json").stdout)
    assert {k: plain[k] for k in d["recipe"] if k in plain} == {
        k: v for k, v in d["recipe"].items() if k in plain}
    assert count_parameters(build_model(model, **d["arguments"])) == d["parameters"]
    assert_one_line_error(here(capsys, "models", "nope"), "unknown model 'nope'")


def test_missing_weights(tmp_path, capsys):
    r = here(capsys, "evaluate", "--weights", str(tmp_path / "none.safetensors"))
    assert_one_line_error(r, "none.safetensors", "no such file")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not really")
    r = here(capsys, "predict", "--weights", str(bad), str(bad))
    assert_one_line_error(r, "bad.safetensors", "not a safetensors")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 1-epoch run on a tiny archive in the official python format, through the CLI."""
    from formats import make_split

    tmp = tmp_path_factory.mktemp("cli")
    arc = python_archive(tmp / "cifar-10-python.tar.gz", *make_split(40))
    r = run("train", "--data", str(arc), "--epochs", "1", "--batch-size", "64",
            "--out", str(tmp / "run"), env_extra={"CIFARCNN_HOME": str(tmp / "home")})
    assert r.returncode == 0, r.stderr
    return tmp, arc, r


def test_info_describes_weights_without_running_them(trained, tmp_path, capsys):
    import hashlib

    tmp, _, _ = trained
    r = here(capsys, "info", tmp / "run", "--json")
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    summary = json.loads((tmp / "run" / "summary.json").read_text())
    weights = tmp / "run" / "weights.safetensors"
    assert d["format"] == "safetensors" and d["model"] == "paper-cnn"
    assert d["parameters"] == summary["parameters"] == 320170
    assert d["sha256"] == hashlib.sha256(weights.read_bytes()).hexdigest()
    assert d["bytes"] == weights.stat().st_size
    assert d["val_accuracy"] == summary["val_accuracy"] and d["epochs"] == 1
    assert d["training"]["train_seconds"] == summary["train_seconds"]
    text = here(capsys, "info", tmp / "run").stdout
    assert f"{summary['val_accuracy']:.2%} with its TTA" in text and "320,170 parameters" in text
    # how the run departed from paper-cnn's recipe travels in the weights themselves
    assert d["recipe_changes"] == {"epochs": 1, "batch_size": 64}
    assert "paper-cnn's, changed: epochs 1, batch_size 64" in text
    # a shipped model's record sits beside it as <name>.json, with the command that made it
    shipped = json.loads((ROOT / "weights" / "fast.json").read_text())
    text = here(capsys, "info", "fast").stdout
    assert shipped["command"] in text and f"{shipped['val_accuracy']:.2%}" in text
    # bad files: one line each
    assert_one_line_error(here(capsys, "info", tmp_path / "no.safetensors"), "no such file")
    (tmp_path / "x.pt").write_text("not a zip")
    assert_one_line_error(here(capsys, "info", tmp_path / "x.pt"), "not a TorchScript export")


def test_bad_model_argument_values_stop_before_the_run_starts(trained, tmp_path, capsys):
    _, arc, _ = trained
    for arg, needle in (("extra_convs=[0,-1,0]", "three counts >= 0"),
                        ("whiten_dims=13", "whiten_dims=13"), ("depth=3", "bad model arguments")):
        r = here(capsys, "train", "--model", "fast", "--model-arg", arg, "--data", str(arc),
                 "--out", str(tmp_path / "r"))
        assert_one_line_error(r, "model fast", needle)
        assert not (tmp_path / "r").exists()


def test_a_run_folder_as_config_repeats_the_run(trained, tmp_path, capsys):
    from safetensors.torch import load_file

    tmp, _, _ = trained
    r = here(capsys, "train", "--config", tmp / "run", "--out", tmp_path / "again")
    assert r.returncode == 0, r.stderr
    old = json.loads((tmp / "run" / "config.json").read_text())
    new = json.loads((tmp_path / "again" / "config.json").read_text())
    assert {**old, "out": None} == {**new, "out": None}
    a = load_file(tmp / "run" / "weights.safetensors")
    b = load_file(tmp_path / "again" / "weights.safetensors")
    assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)
    # the file's `out` is not used: without --out, the rerun does not touch the old run
    r = here(capsys, "train", "--config", tmp / "run" / "config.json", "--seed", "1",
             "--epochs", "2", "--print-config")
    printed = json.loads(r.stdout)
    assert printed["out"] is None and printed["seed"] == 1 and printed["epochs"] == 2
    assert printed["batch_size"] == old["batch_size"] == 64


def test_config_files_set_defaults_that_flags_override(tmp_path, capsys):
    (tmp_path / "f.toml").write_text('model = "fast"\nepochs = 3\nlr = 0.05\ntta_every_epoch = '
                                     'true\n[model_kwargs]\nwidths = [16, 32, 32]\n')
    r = here(capsys, "train", "--config", tmp_path / "f.toml", "--lr", "0.07",
             "--model-arg", "bn_momentum=0.5", "--print-config")
    assert r.returncode == 0, r.stderr
    c = json.loads(r.stdout)
    assert (c["model"], c["epochs"], c["lr"], c["tta_every_epoch"]) == ("fast", 3, 0.07, True)
    assert c["model_kwargs"] == {"widths": [16, 32, 32], "bn_momentum": 0.5}
    assert c["select_fraction"] == 0.7 and c["device"] == "auto"  # the recipe; as given
    # what --print-config writes, --config reads back unchanged
    (tmp_path / "c.json").write_text(r.stdout)
    r = here(capsys, "experiment", "--config", tmp_path / "c.json", "--print-config")
    assert r.returncode == 0 and json.loads(r.stdout) == c
    for text, needle in (('model = "fast"\nepoch = 3\n', "'epoch' is no setting (did you mean "
                          "'epochs'?)"),
                         ("epochs = 2.5\n", "'epochs' is 2.5, not int"),
                         ("epochs = \n", "not valid TOML"),
                         ("[1, 2]", "no JSON object")):
        f = tmp_path / ("bad.json" if text.startswith("[") else "bad.toml")
        f.write_text(text)
        assert_one_line_error(here(capsys, "train", "--config", f), f"--config {f}", needle)
    assert_one_line_error(here(capsys, "train", "--config", tmp_path), "without config.json")
    assert_one_line_error(here(capsys, "train", "--config", tmp_path / "f.toml", "--resume",
                               tmp_path), "leave out --config")


def test_train_prints_one_line_per_epoch(trained):
    _, _, r = trained
    assert "epoch   1/1" in r.stdout and "val loss" in r.stdout and "img/s" in r.stdout


def test_evaluate_reproduces_training_accuracy(trained):
    tmp, arc, _ = trained
    summary = json.loads((tmp / "run" / "summary.json").read_text())
    r = run("evaluate", "--weights", str(tmp / "run"), "--data", str(arc), "--json",
            env_extra={"CIFARCNN_HOME": str(tmp / "home")})
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["correct"] == summary["val_correct"]


def test_weights_with_infinite_values_are_refused_in_one_line(trained, tmp_path, capsys,
                                                               monkeypatch):
    from safetensors.torch import load_file

    from cifarcnn.inference import calibration_sums
    from cifarcnn.weights import read_meta, save_state

    tmp, arc, _ = trained
    monkeypatch.setenv("CIFARCNN_HOME", str(tmp / "home"))
    src = tmp / "run" / "weights.safetensors"
    state = load_file(str(src))
    bias = [k for k in state if k.endswith("bias")][-1]
    state[bias][3] = float("inf")
    save_state(tmp_path / "w.safetensors", state, read_meta(src))
    # refused at load, by every command that reads weights: before, predict printed
    # "nan%" and export's equality check let NaN through (NaN compares false)
    for args in (["evaluate", "--data", arc], ["predict", tmp_path / "x.png"],
                 ["export", "--format", "onnx", "--no-check"]):
        r = here(capsys, args[0], "--weights", tmp_path / "w.safetensors", *args[1:])
        assert_one_line_error(r, f"tensor '{bias}' holds NaN or infinite values")
    assert not list(tmp_path.glob("*.onnx"))
    # NaN outputs fall into the lowest confidence bin rather than crash the binning
    sums = calibration_sums(torch.tensor([[float("nan"), 0.0], [2.0, 0.0]]),
                            torch.tensor([0, 0]))
    assert sums[:15].sum() == 2 and sums[0] == 1


def test_evaluate_with_a_tta_gate_reports_its_views_and_refuses_bad_gates(trained, capsys,
                                                                          monkeypatch):
    tmp, arc, _ = trained
    monkeypatch.setenv("CIFARCNN_HOME", str(tmp / "home"))
    r = here(capsys, "evaluate", "--weights", str(tmp / "run"), "--data", str(arc), "--tta-gate",
             "0.5")
    assert r.returncode == 0, r.stderr
    assert "with flip TTA (" in r.stdout
    views = float(r.stdout.split("; TTA gated at 0.5: ")[1].split(" views per image\n")[0])
    assert 1 <= views <= 2
    assert "recorded at training time, every view of every image:" in r.stdout
    r = here(capsys, "predict", "--weights", str(tmp / "run"), "--tta-gate", "1.5", "x.png")
    assert_one_line_error(r, "TTA gate 1.5", "between 0 and 1")
    # an export runs its views inside its graph: evaluated as it is, refused with a gate
    r = here(capsys, "export", "--weights", str(tmp / "run"), "--format", "torchscript", "--out",
             str(tmp / "m.pt"), "--no-check")
    assert r.returncode == 0, r.stderr
    r = here(capsys, "evaluate", "--weights", str(tmp / "m.pt"), "--data", str(arc))
    assert r.returncode == 0 and "with flip TTA" in r.stdout and "gated" not in r.stdout, r.stderr
    r = here(capsys, "evaluate", "--weights", str(tmp / "m.pt"), "--data", str(arc), "--tta-gate",
             "0.5")
    assert_one_line_error(r, "m.pt", "a TTA gate needs the safetensors weights")


def test_predict_any_image_and_unreadable_image(trained, tmp_path, capsys):
    tmp, _, _ = trained
    big = tmp_path / "photo.jpg"
    Image.fromarray(np.full((300, 200, 3), 90, np.uint8)).save(big)
    gray = tmp_path / "gray.png"
    Image.new("L", (32, 32), 3).save(gray)
    r = here(capsys, "predict", "--weights", str(tmp / "run"), str(big), str(gray), "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert [o["file"] for o in out] == [str(big), str(gray)]
    probs = [t["probability"] for t in out[0]["top"]]
    assert len(probs) == 3 and probs == sorted(probs, reverse=True) and 0 < probs[0] <= 1
    r = here(capsys, "predict", "--weights", str(tmp / "run"), str(gray), "--top", "10", "--json")
    assert abs(sum(t["probability"] for t in json.loads(r.stdout)["top"]) - 1) < 1e-4
    with open(big, "rb") as f:  # - : one image on standard input, as a pipe gives it
        r = run("predict", "--weights", str(tmp / "run"), "-", str(gray), "--json", stdin=f)
    assert r.returncode == 0, r.stderr
    assert [o["file"] for o in json.loads(r.stdout)] == ["-", str(gray)]
    assert json.loads(r.stdout)[0]["top"] == out[0]["top"]
    r = here(capsys, "predict", "--weights", str(tmp / "run"), "-", "-")
    assert_one_line_error(r, "standard input", "twice")
    # a folder: its image files at any depth, sorted; other files passed over
    (tmp_path / "album" / "b").mkdir(parents=True)
    shutil.copy(gray, tmp_path / "album" / "b" / "z.PNG")
    shutil.copy(big, tmp_path / "album" / "a.jpg")
    (tmp_path / "album" / "notes.txt").write_text("not an image")
    (tmp_path / "album" / "scan.pdf").write_text("PIL writes PDFs but cannot read them")
    r = here(capsys, "predict", "--weights", str(tmp / "run"), str(tmp_path / "album"), str(gray),
             "--json")
    assert r.returncode == 0, r.stderr
    assert [o["file"] for o in json.loads(r.stdout)] == [
        str(tmp_path / "album" / "a.jpg"), str(tmp_path / "album" / "b" / "z.PNG"), str(gray)]
    (tmp_path / "empty").mkdir()
    r = here(capsys, "predict", "--weights", str(tmp / "run"), str(tmp_path / "empty"))
    assert_one_line_error(r, "empty", "no image files")
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    r = here(capsys, "predict", "--weights", str(tmp / "run"), str(broken))
    assert_one_line_error(r, "broken.png", "not a readable image")
    r = here(capsys, "predict", "--weights", str(tmp / "run"), str(tmp_path / "absent.png"))
    assert_one_line_error(r, "absent.png")


def test_our_warnings_print_as_one_line_without_a_source_path(monkeypatch, capsys):
    """cifarcnn's own warnings (here: bf16 asked for on a CPU that emulates it) read as the
    CLI's other messages do; the error that follows is unchanged."""
    from cifarcnn import cli, config

    monkeypatch.setattr(config, "cpu_has_bf16", lambda: False)
    code = cli.main(["train", "--model", "paper-cnn", "--precision", "bf16",
                     "--data", "/nonexistent", "--out", "/nonexistent-run"])
    err = capsys.readouterr().err.splitlines()
    assert code == 2
    assert err[0].startswith("cifarcnn train: warning: --precision bf16 on a CPU without bf16")
    assert err[1].startswith("cifarcnn train: error: --data /nonexistent")
    assert len(err) == 2 and "config.py" not in "\n".join(err)


def test_read_images_keeps_the_order_and_names_the_first_bad_file(tmp_path):
    """Files are decoded on several threads: the batch must still follow the paths, and
    the error be the one reading them one by one gives."""
    from formats import png_bytes

    from cifarcnn.datasets import decode_image
    from cifarcnn.errors import CifarError
    from cifarcnn.inference import read_images

    rng = np.random.default_rng(0)
    paths = []
    for i in range(40):
        paths.append(tmp_path / f"{i:02d}.png")
        paths[-1].write_bytes(png_bytes(rng.integers(0, 256, (8 + i, 40, 3), dtype=np.uint8)))
    expect = np.stack([decode_image(p.read_bytes(), str(p)) for p in paths])
    np.testing.assert_array_equal(read_images(paths), expect)
    paths[7].write_bytes(b"broken")
    paths[30].unlink()
    with pytest.raises(CifarError, match=r"07\.png: not a readable image"):
        read_images(paths)


def test_version_help_and_flag_errors_answer_without_importing_torch():
    """torch takes ~2 s to import: a typo or --help should not wait for it."""
    code = ("import sys, cifarcnn\nfrom cifarcnn.cli import main\n"
            "for argv in (['--version'], ['--help'], ['train', '--epochs', 'x']):\n"
            "    try:\n        main(argv)\n    except SystemExit:\n        pass\n"
            "print('torch' in sys.modules)\n"
            "print(cifarcnn.load.__module__)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    out = r.stdout.splitlines()
    assert out[0].startswith("cifarcnn 0.1.0 (torch ") and "Python 3." in out[0]
    assert out[-2:] == ["False", "cifarcnn.inference"]  # load() still there, on first use
    assert "invalid int value: 'x'" in r.stderr


def test_cpu_inference_runs_in_small_batches_with_the_same_answers(tmp_path, monkeypatch):
    from formats import make_split

    import cifarcnn
    from cifarcnn import inference

    assert inference.eval_batch("cpu", 1000) == inference.CPU_EVAL_BATCH == 128
    assert inference.eval_batch("cpu", 50) == 50 and inference.eval_batch("cuda", 1000) == 1000
    clf = cifarcnn.load("paper-cnn")
    x = np.random.default_rng(0).integers(0, 256, (300, 32, 32, 3), dtype=np.uint8)
    capped = clf.predict(x)
    monkeypatch.setattr(inference, "CPU_EVAL_BATCH", 1 << 20)  # one batch of 300, as before
    np.testing.assert_allclose(clf.predict(x), capped, atol=1e-5)
    monkeypatch.undo()
    arc = python_archive(tmp_path / "cifar-10-python.tar.gz", *make_split(300))
    bench = ROOT / "benchmarks" / "eval_batch.py"
    r = subprocess.run([sys.executable, str(bench), "--data", str(arc), "--weights", "paper-cnn",
                        "--batches", "300", "7", "--images", "300", "--rounds", "1",
                        "--precision", "fp32"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    rows = [[c.strip() for c in line.split("|")[1:-1]] for line in r.stdout.splitlines()
            if line.startswith("| paper-cnn")]
    assert [row[2:4] for row in rows] == [["fp32", "300"], ["fp32", "7"]]
    assert rows[0][6] == rows[1][6] and all(float(row[5].replace(",", "")) > 0 for row in rows)
    r = subprocess.run([sys.executable, str(bench), "--batches", "0"], capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 2 and "at least 1" in r.stderr and "Traceback" not in r.stderr


def test_output_into_a_reader_that_left_ends_quietly():
    """`cifarcnn models | head -1`: once the reader has gone, the CLI stops with the
    shell's SIGPIPE code and no traceback, rather than a BrokenPipeError at exit."""
    import os

    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader is gone before the first write
    try:
        r = subprocess.run([sys.executable, "-m", "cifarcnn", "models"], stdout=write_end,
                           stderr=subprocess.PIPE, text=True, timeout=300)
    finally:
        os.close(write_end)
    assert r.returncode == 141, r.stderr
    assert r.stderr == ""


def test_predict_fetches_http_urls_in_order_and_names_a_failing_one(tmp_path, capsys):
    import http.server
    import threading

    from formats import png_bytes

    rng = np.random.default_rng(0)
    pngs = {f"/{i}.png": png_bytes(rng.integers(0, 256, (40, 50, 3), dtype=np.uint8))
            for i in range(2)}

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            body = pngs.get(self.path, b"<html>not here</html>" if self.path == "/page"
                            else None)
            if body is None:
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        (tmp_path / "local.png").write_bytes(pngs["/1.png"])
        r = here(capsys, "predict", "--weights", "paper-cnn", "--json", f"{url}/0.png",
                 tmp_path / "local.png", f"{url}/1.png")
        assert r.returncode == 0, r.stderr
        got = json.loads(r.stdout)
        assert [g["file"] for g in got] == [f"{url}/0.png", str(tmp_path / "local.png"),
                                            f"{url}/1.png"]
        assert got[1]["top"] == got[2]["top"]  # the same image, from a file and a URL
        assert_one_line_error(here(capsys, "predict", "--weights", "paper-cnn",
                                   f"{url}/missing.png"),
                              f"{url}/missing.png: the server answered HTTP 404")
        assert_one_line_error(here(capsys, "predict", "--weights", "paper-cnn", f"{url}/page"),
                              f"{url}/page: not a readable image")
    finally:
        server.shutdown()
        server.server_close()
    assert_one_line_error(here(capsys, "predict", "--weights", "paper-cnn", f"{url}/0.png"),
                          f"{url}/0.png: cannot fetch it")


def test_evaluate_writes_one_prediction_row_per_test_image(trained, tmp_path, capsys):
    import csv

    tmp, arc, _ = trained
    out = tmp_path / "pred.csv"
    r = here(capsys, "evaluate", "--weights", tmp / "run", "--data", arc, "--json",
             "--predictions", out)
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout)  # the probabilities go to the file, not the JSON
    rows = list(csv.DictReader(out.open()))
    assert len(rows) == summary["n"] == 40
    assert [int(row["index"]) for row in rows] == list(range(40))
    assert sum(int(row["correct"]) for row in rows) == summary["correct"]
    classes = [k[2:] for k in rows[0] if k.startswith("p_")]
    assert len(classes) == 10
    for row in rows:
        probs = [float(row[f"p_{c}"]) for c in classes]
        assert abs(sum(probs) - 1) < 1e-4 and row["predicted"] == classes[probs.index(max(probs))]
        assert float(row["confidence"]) == max(probs)
        assert int(row["correct"]) == (row["true"] == row["predicted"])
    # top-5: the true class among each row's five likeliest; ties at the fifth place (this
    # 1-epoch net gives many classes 0.000000) can fall either way
    surely_in = surely_out = 0
    for row in rows:
        ranked = sorted((float(row[f"p_{c}"]) for c in classes), reverse=True)
        true = float(row[f"p_{row['true']}"])
        surely_in += true > ranked[5]
        surely_out += true < ranked[4]
    top5 = round(summary["top5_accuracy"] * 40)
    assert surely_in <= top5 <= 40 - surely_out and top5 >= summary["correct"]
    assert surely_in > summary["correct"]  # the bound says more than top-1 does
    # an export writes the same rows; a path that cannot take the file stops before work
    onnx = tmp_path / "m.onnx"
    assert here(capsys, "export", "--weights", tmp / "run", "--format", "onnx", "--out", onnx,
                "--no-check").returncode == 0
    r = here(capsys, "evaluate", "--weights", onnx, "--data", arc, "--predictions",
             tmp_path / "pred-onnx.csv")
    assert r.returncode == 0, r.stderr
    assert f"({summary['correct']}/40), top-5 {top5 / 40:.2%}, loss" in r.stdout
    again = list(csv.DictReader((tmp_path / "pred-onnx.csv").open()))
    for a, b in zip(rows, again, strict=True):  # the same, but for near-ties (1e-6 apart)
        top2 = sorted(float(a[f"p_{c}"]) for c in classes)[-2:]
        assert a["predicted"] == b["predicted"] or top2[1] - top2[0] < 1e-4
    assert_one_line_error(here(capsys, "evaluate", "--weights", tmp / "run", "--data", arc,
                               "--predictions", tmp_path / "no" / "p.csv"),
                          "--predictions", "does not exist")
