"""The UI's job manager on real processes: the queue, exit statuses, stop (SIGTERM, then SIGKILL for a process
that ignores it, the whole process group), and a restarted app finding its jobs again."""

from __future__ import annotations

import json
import os
import sys
import time

from ui_support import wait_for

from dopsd.ui.home import Home
from dopsd.ui.jobs import JobManager, _proc_start, dopsd_command

PY = sys.executable


def py(code: str) -> list[str]:
    return [PY, "-c", code]


def settle(jobs: JobManager, job_id: str, timeout: float = 30.0) -> str:
    def done():
        jobs.tick()
        return jobs.get(job_id).status in ("succeeded", "failed", "stopped", "cancelled", "lost")

    wait_for(done, timeout, 0.1, f"job {job_id} to end")
    return jobs.get(job_id).status


def test_exit_status_output_and_queue_order(tmp_path):
    jobs = JobManager(Home(tmp_path), max_running=1)
    ok = jobs.submit("t", py("print('hello from the job')"), "ok")
    bad = jobs.submit("t", py("import sys; print('bad input'); sys.exit(3)"), "bad")
    assert jobs.get(ok.id).status == "running" and jobs.get(bad.id).status == "queued"  # one at a time
    assert settle(jobs, ok.id) == "succeeded"
    assert settle(jobs, bad.id) == "failed"
    assert jobs.get(bad.id).returncode == 3 and "exit code 3" in jobs.get(bad.id).message
    assert "hello from the job" in jobs.log_tail(jobs.get(ok.id))
    assert jobs.get(ok.id).ended <= jobs.get(bad.id).started  # the queue waited for the first job


def test_two_slots_run_together_and_unqueued_jobs_skip_the_queue(tmp_path):
    jobs = JobManager(Home(tmp_path), max_running=1)
    long = jobs.submit("t", py("import time; time.sleep(30)"), "long")
    quick = jobs.submit("export", py("print(1)"), "quick", queued=False)
    assert jobs.get(quick.id).status == "running"  # an unqueued job starts although the slot is taken
    waiting = jobs.submit("t", py("print(2)"), "waits")
    assert jobs.get(waiting.id).status == "queued"
    jobs.set_max_running(2)
    assert jobs.get(waiting.id).status in ("running", "succeeded")
    jobs.stop(long.id)
    assert settle(jobs, long.id) == "stopped"


def test_stop_escalates_to_sigkill_for_the_whole_group(tmp_path):
    jobs = JobManager(Home(tmp_path), max_running=1, grace=0.5)
    marker = tmp_path / "grandchild.pid"
    # The job ignores SIGTERM and starts a grandchild that ignores it too: both must end.
    code = (
        "import signal, subprocess, sys, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
        f"p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); "
        f"open({str(marker)!r}, 'w').write(str(p.pid)); print('ready', flush=True); time.sleep(60)"
    )
    job = jobs.submit("t", py(code), "stubborn")
    wait_for(lambda: marker.is_file() and marker.read_text(), 20, 0.1, "the grandchild")
    grandchild = int(marker.read_text())
    t0 = time.time()
    jobs.stop(job.id)
    assert jobs.get(job.id).status == "stopping"
    assert settle(jobs, job.id) == "stopped"
    assert time.time() - t0 < 10
    assert "killed" in jobs.get(job.id).message
    wait_for(lambda: _proc_start(grandchild) is None, 10, 0.1, "the grandchild to be gone")


def test_sigterm_reaches_the_command_and_the_status_is_kept(tmp_path):
    jobs = JobManager(Home(tmp_path), max_running=1, grace=30)
    job = jobs.submit("t", py("import time; print('up', flush=True); time.sleep(60)"), "sleeper")
    wait_for(lambda: "up" in jobs.log_tail(jobs.get(job.id)), 20, 0.1, "the job to start")
    jobs.stop(job.id)
    assert settle(jobs, job.id) == "stopped"
    assert jobs.get(job.id).returncode == -15  # recorded by the runner: the command died of the SIGTERM itself
    blocker = jobs.submit("t", py("import time; time.sleep(30)"), "blocker")
    never = jobs.submit("t", py("print(1)"), "never")
    assert jobs.get(never.id).status == "queued"
    assert jobs.stop(never.id).status == "cancelled"
    jobs.stop(blocker.id)
    assert settle(jobs, blocker.id) == "stopped"
    assert not (tmp_path / ".ui" / "logs" / f"{never.id}.log").exists()  # a cancelled job never ran


def test_a_restarted_app_adopts_running_jobs_and_settles_finished_ones(tmp_path):
    home = Home(tmp_path)
    first = JobManager(home, max_running=2)
    flag = tmp_path / "go"
    running = first.submit(
        "t",
        py(f"import os, time\nwhile not os.path.exists({str(flag)!r}): time.sleep(0.05)\nraise SystemExit(4)"),
        "still running",
    )
    finished = first.submit("t", py("print('done')"), "finishes while the app is down")
    wait_for(lambda: first.get(running.id).pid_start, 10, 0.1, "the job's process")
    first.shutdown()  # the app stops: its jobs go on
    time.sleep(1.0)  # `finished` ends meanwhile, unobserved

    records = json.loads((home.state / "jobs.json").read_text())["jobs"]
    assert {r["id"]: r["status"] for r in records}[running.id] == "running"

    second = JobManager(home, max_running=2)
    assert second.get(running.id).status == "running" and "adopted" in second.get(running.id).message
    assert settle(second, finished.id) == "succeeded"  # its exit status came from the runner's .rc file
    flag.write_text("")
    assert settle(second, running.id) == "failed"
    assert second.get(running.id).returncode == 4


def test_a_job_whose_process_vanished_without_a_status_is_lost(tmp_path):
    home = Home(tmp_path)
    record = {
        "id": "00001-train",
        "kind": "train",
        "title": "ghost",
        "argv": ["x"],
        "status": "running",
        "pid": 2**22 + 12345,
        "pid_start": "1",
        "created": time.time(),
    }
    (home.state / "jobs.json").write_text(json.dumps({"version": 1, "jobs": [record]}))
    jobs = JobManager(home)
    assert jobs.get("00001-train").status == "lost"
    assert os.path.isfile(home.state / "jobs.json")


def test_an_unreadable_jobs_file_is_kept_aside_not_deleted(tmp_path):
    home = Home(tmp_path)
    (home.state / "jobs.json").write_text("{ not json")
    jobs = JobManager(home)
    assert jobs.list() == []
    kept = list(home.state.glob("jobs.unreadable-*.json"))
    assert len(kept) == 1 and kept[0].read_text() == "{ not json"


def test_a_failed_command_says_why_in_its_own_words(tmp_path):
    """What the run page shows for a failed start or resume: the command's last `dopsd COMMAND: …` message
    (not the progress before it), else the last lines of its output."""
    jobs = JobManager(Home(tmp_path), max_running=1)
    missing = tmp_path / "nowhere.yaml"
    refused = jobs.submit("train", dopsd_command("train", str(missing)), "train x")
    assert settle(jobs, refused.id, 120) == "failed"
    reason = jobs.failure_reason(jobs.get(refused.id))
    assert reason.startswith("dopsd train: ") and "nowhere.yaml" in reason, reason
    other = jobs.submit("t", py("print('step 1'); print('disk is on fire'); raise SystemExit(4)"), "other")
    assert settle(jobs, other.id) == "failed"
    assert jobs.failure_reason(jobs.get(other.id)) == "step 1\ndisk is on fire"
