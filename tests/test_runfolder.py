"""The run folder: --overwrite never deletes and only moves dopsd runs aside, a failed start writes nothing, a running
run (or a worker of one) locks its folder, and a lock of a dead process does not."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from conftest import tiny_config, write_concept_folder

import dopsd
from dopsd import cli
from dopsd.data.dataset import DatasetError
from dopsd.errors import RunFolderError
from dopsd.mini.adapter import tiny_random_adapter
from dopsd.runs import folder as rundir
from dopsd.runs import lock as runlock
from dopsd.training.health import TRAINING_PROMPTS_THRESHOLD


def adapter():
    return tiny_random_adapter(0, teacher_context="reference")


def snapshot(folder):
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def finished_run(tmp_path, data, name="run", **overrides):
    cfg = tiny_config(tmp_path, data, **{"train.output_dir": tmp_path / name, "train.max_steps": 2, **overrides})
    dopsd.train(cfg, adapter=adapter())
    return tmp_path / name


def test_a_new_run_folder_has_the_marker_and_a_status(tmp_path, concept_data):
    out = finished_run(tmp_path, concept_data)
    marker = json.loads((out / rundir.MARKER).read_text())
    assert marker["format"] == "dopsd-run" and marker["version"] == 1 and marker["dopsd"]
    assert json.loads((out / rundir.SUMMARY).read_text())["status"] == "ok"
    assert rundir.is_run_folder(out) and not runlock.is_running(out)


def test_progress_and_health_files_follow_the_run(tmp_path, concept_data):
    """progress.json while a run trains and at its end; health.jsonl one record per few-step health measurement."""
    seen = []

    def watch(trainer, record):
        seen.append(json.loads((trainer.out / rundir.PROGRESS).read_text()))

    cfg = tiny_config(tmp_path, concept_data, **{"train.max_steps": 4, "sample.every": 2})
    result = dopsd.train(cfg, adapter=adapter(), callback=watch)
    first = seen[0]  # written before the first step, not yet after it (at most once a second)
    assert first["status"] == "running" and first["step"] == 0 and first["max_steps"] == 4
    assert first["pid"] == os.getpid() and first["eta_seconds"] is None and first["started"] <= first["updated"]
    assert seen[2]["step"] == 2  # the interval at step 2 rewrote it
    final = json.loads((result.output_dir / rundir.PROGRESS).read_text())
    assert final["status"] == "ok" and final["step"] == 4 and final["eta_seconds"] == 0.0
    assert final["started"] == first["started"]
    records = [json.loads(line) for line in (result.output_dir / rundir.HEALTH).read_text().splitlines()]
    assert [r["step"] for r in records] == [0, 2, 4]  # before training, the interval, the end
    assert all(
        0.5 < r["health"] < 1.5 and r["threshold"] == TRAINING_PROMPTS_THRESHOLD and not r["broken"] for r in records
    )
    assert {"sharpness", "structure", "warning"} <= set(records[-1]) and not any("/" in k for k in records[-1])
    assert records[-1]["health"] == result.summary["health"]["health"]


def test_overwrite_refuses_the_folder_holding_the_dataset_and_the_working_directory(tmp_path, monkeypatch):
    holder = tmp_path / "project"
    data = write_concept_folder(holder / "images")
    (holder / "config.yaml").write_text("model: {}\ndata: {}\ntrain: {}\n")  # looks like an old run folder
    (holder / "summary.json").write_text("{}")
    before = snapshot(holder)
    for out in (holder, data):  # the dataset's parent, the dataset itself
        cfg = tiny_config(tmp_path, data, **{"train.output_dir": out})
        with pytest.raises(RunFolderError, match="data.path|not a dopsd run folder"):
            dopsd.train(cfg, overwrite=True, adapter=adapter())
    assert snapshot(holder) == before
    # A real dopsd run that holds the dataset or the feature cache is never moved either.
    run = finished_run(tmp_path, data, name="run_with_data")
    inside = write_concept_folder(run / "data")
    (run / "cache").mkdir()
    for key, value in (("data.path", inside), ("cache.dir", run / "cache")):
        cfg = tiny_config(tmp_path, data, **{"train.output_dir": run, key: value})
        with pytest.raises(
            RunFolderError, match=f"contains {'data.path' if key == 'data.path' else 'the feature cache'}"
        ):
            dopsd.train(cfg, overwrite=True, adapter=adapter())
        assert (inside / "img00.png").is_file() and not list(tmp_path.glob("run_with_data.replaced-*"))
    work = tmp_path / "work"  # train.output_dir=. in a folder with the user's files
    work.mkdir()
    (work / "notes.txt").write_text("mine")
    monkeypatch.chdir(work)
    cfg = tiny_config(tmp_path, write_concept_folder(tmp_path / "data2"), **{"train.output_dir": "."})
    with pytest.raises(RunFolderError, match="not a dopsd run folder"):
        dopsd.train(cfg, overwrite=True, adapter=adapter())
    assert (work / "notes.txt").read_text() == "mine" and sorted(p.name for p in work.iterdir()) == ["notes.txt"]
    # Even a real dopsd run is never moved while it is the working directory.
    run = finished_run(tmp_path, tmp_path / "data2", name="cwd_run")
    monkeypatch.chdir(run)
    with pytest.raises(RunFolderError, match="current directory"):
        dopsd.train(
            tiny_config(tmp_path, tmp_path / "data2", **{"train.output_dir": "."}), overwrite=True, adapter=adapter()
        )
    assert (run / "summary.json").is_file()


def test_overwrite_changes_nothing_when_the_new_start_fails_then_moves_the_old_run_aside(
    tmp_path, concept_data, capsys
):
    out = finished_run(tmp_path, concept_data)
    (out / "my_notes.txt").write_text("keep me")
    before = snapshot(out)
    bad = write_concept_folder(tmp_path / "bad")
    (bad / "img00.txt").write_text("")  # an empty caption
    with pytest.raises(DatasetError):
        dopsd.train(tiny_config(tmp_path, bad, **{"train.max_steps": 2}), overwrite=True, adapter=adapter())
    with pytest.raises(Exception, match="pretrained|not found|no such|does not exist"):  # a bad model folder
        dopsd.train(
            tiny_config(tmp_path, concept_data, **{"model.pretrained": str(tmp_path / "nowhere")}), overwrite=True
        )
    assert snapshot(out) == before and [p.name for p in tmp_path.glob("run.replaced-*")] == []
    result = dopsd.train(
        tiny_config(tmp_path, concept_data, **{"train.max_steps": 2}), overwrite=True, adapter=adapter()
    )
    (aside,) = tmp_path.glob("run.replaced-*")
    assert snapshot(aside) == before  # the whole earlier run, the user's file included, moved intact
    assert result.summary["replaced"] == str(aside) and f"aside to {aside}" in capsys.readouterr().out
    assert not (out / "my_notes.txt").exists() and (out / rundir.MARKER).is_file()


def test_an_old_run_folder_without_the_marker_is_recognised_only_when_it_holds_nothing_else(tmp_path, concept_data):
    out = finished_run(tmp_path, concept_data)
    (out / rundir.MARKER).unlink()  # as written by a dopsd version before the marker
    for name in (rundir.OWNER_LOCK, rundir.WORKERS_LOCK):
        (out / name).unlink()
    assert rundir.legacy_run(out)
    (out / "thesis.tex").write_text("not dopsd's")
    with pytest.raises(RunFolderError, match="thesis.tex"):
        dopsd.train(tiny_config(tmp_path, concept_data), overwrite=True, adapter=adapter())
    (out / "thesis.tex").unlink()
    dopsd.train(tiny_config(tmp_path, concept_data, **{"train.max_steps": 2}), overwrite=True, adapter=adapter())
    assert len(list(tmp_path.glob("run.replaced-*"))) == 1


def test_a_failed_start_writes_nothing_so_the_corrected_start_runs(tmp_path, concept_data, capsys):
    out = tmp_path / "run"
    bad = write_concept_folder(tmp_path / "bad")
    (bad / "img01.txt").unlink()  # a missing caption
    args = [
        "train",
        "mini",
        f"data.path={bad}",
        f"train.output_dir={out}",
        "train.max_steps=1",
        "log.progress=false",
        f"cache.dir={tmp_path / 'cache'}",
        "sample.control_steps=0",
        "sample.seeds=[0]",
    ]
    assert cli.main(args) == 2
    # (the exit code of a missing model folder is the model loaders' business; here: that nothing was written)
    assert (
        cli.main(args[:2] + [f"data.path={concept_data}", f"model.pretrained={tmp_path / 'missing_model'}"] + args[3:])
        != 0
    )
    with pytest.raises(Exception):  # noqa: B017 — a learning rate the optimizer rejects (the message is the config's business)
        dopsd.train(tiny_config(tmp_path, concept_data, **{"optim.lr": float("nan")}), adapter=adapter())
    assert not out.exists()
    capsys.readouterr()
    cfg = tiny_config(tmp_path, concept_data, **{"train.max_steps": 1})
    assert dopsd.train(cfg, adapter=adapter()).steps == 1  # no --overwrite needed


def test_an_output_dir_that_is_a_file_and_resume_with_overwrite_are_refused(tmp_path, concept_data):
    target = tmp_path / "file.txt"
    target.write_text("mine")
    with pytest.raises(RunFolderError, match="is a file"):
        dopsd.train(tiny_config(tmp_path, concept_data, **{"train.output_dir": target}), adapter=adapter())
    with pytest.raises(RunFolderError, match="pass one"):
        dopsd.train(tiny_config(tmp_path, concept_data), resume=True, overwrite=True, adapter=adapter())
    with pytest.raises(RunFolderError, match="not a dopsd run folder"):
        dopsd.train(tiny_config(tmp_path, concept_data), resume=True, adapter=adapter())
    assert target.read_text() == "mine"


def test_overrides_may_follow_the_flags(tmp_path, capsys):
    assert cli.main(["train", "mini", "--print-config", "optim.lr=0.123", "train.max_steps=7"]) == 0
    printed = capsys.readouterr().out
    assert "lr: 0.123" in printed and "max_steps: 7" in printed


def _popen(args, **kw):
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, *args], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, **kw)


def _wait_for(check, proc, what, timeout=120):
    deadline = time.time() + timeout
    while not check():
        assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
        assert time.time() < deadline, f"no {what} within {timeout} s"
        time.sleep(0.05)


def test_a_running_run_locks_its_folder_and_a_killed_one_does_not(tmp_path, concept_data, tiny_mini, capsys):
    cfg = tiny_config(
        tmp_path, concept_data, **{"model.pretrained": tiny_mini, "train.max_steps": 400, "train.checkpoint_every": 1}
    )
    config_file = tmp_path / "run.yaml"
    config_file.write_text(cfg.to_yaml())
    out = tmp_path / "run"
    proc = _popen(["-m", "dopsd.cli", "train", str(config_file)])
    try:
        _wait_for(lambda: (out / "checkpoints" / "step-0000001" / "state.json").is_file(), proc, "checkpoint")
        assert runlock.is_running(out)
        code = cli.main(["train", str(config_file), "--resume", "train.max_steps=2"])  # a second start, same run
        assert code == 2 and "in use by another dopsd process (pid" in capsys.readouterr().err
        assert proc.poll() is None  # the first run goes on untouched
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        proc.stderr.close()
    assert not runlock.is_running(out)  # the kernel dropped the dead process's lock
    done = max(int(p.name.split("-")[1]) for p in (out / "checkpoints").glob("step-*"))
    result = dopsd.train(config_file, [f"train.max_steps={done + 1}"], resume=True)
    assert result.steps == done + 1


WORKER = """
import fcntl, os, sys, time
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)
fcntl.flock(fd, fcntl.LOCK_SH)
open(sys.argv[2], "w").close()
time.sleep(600)
"""


def test_a_surviving_worker_of_an_earlier_run_blocks_a_new_start(tmp_path, concept_data):
    """What a torchrun worker does while its run lives (a shared hold on the workers lock); here it outlives its
    launcher and main process, as after `kill -9` of torchrun."""
    out = finished_run(tmp_path, concept_data)
    ready = tmp_path / "ready"
    worker = _popen(["-c", WORKER, str(out / rundir.WORKERS_LOCK), str(ready)])
    try:
        _wait_for(ready.exists, worker, "worker lock")
        with pytest.raises(RunFolderError, match="still working in .*fuser -v"):
            dopsd.train(tiny_config(tmp_path, concept_data, **{"train.max_steps": 3}), resume=True, adapter=adapter())
        with pytest.raises(RunFolderError, match="still working"):
            dopsd.train(tiny_config(tmp_path, concept_data), overwrite=True, adapter=adapter())
    finally:
        worker.send_signal(signal.SIGKILL)
        worker.wait()
        worker.stderr.close()
    assert (
        dopsd.train(tiny_config(tmp_path, concept_data, **{"train.max_steps": 3}), resume=True, adapter=adapter()).steps
        == 3
    )
