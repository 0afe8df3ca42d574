"""Every endpoint of `dopsd ui` through Starlette's test client, with the real commands behind it: a miniature run
(stopped, then resumed to its end), the teacher probe, a comparison, exports, the demo and a small benchmark. The
dataset endpoints, which start no command, are in tests/test_ui_api_datasets.py."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
from PIL import Image
from starlette.testclient import TestClient
from ui_support import FAST_RUN, HEADERS, close_ctx, make_ctx, wait_for, write_zimage_lora_run

from dopsd.ui import adapter
from dopsd.ui.server import create_app

pytestmark = pytest.mark.slow


def ended(client: TestClient, job_id: str) -> dict:
    job = client.get(f"/api/jobs/{job_id}").json()
    return job if job["status"] in ("succeeded", "failed", "stopped", "cancelled", "lost") else None


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A home with the miniature's concept dataset, a run stopped part-way and resumed to its end, a probe, the
    demo and a tiny benchmark — started together (two jobs at a time) so the module takes about a minute."""
    home = tmp_path_factory.mktemp("ui-home")
    ctx = make_ctx(home, max_jobs=2)
    client = TestClient(create_app(ctx), headers=HEADERS)
    try:
        assert client.post("/api/datasets", json={"mini": True}).status_code == 200
        run = client.post(
            "/api/runs", json={"preset": "mini", "dataset": "mini-concept", "name": "run1", "values": FAST_RUN}
        )
        assert run.status_code == 200, run.text
        probe = client.post(
            "/api/probes",
            json={
                "preset": "mini",
                "dataset": "mini-concept",
                "name": "probe1",
                "values": {"data.trigger_word": "sks"},
                "seeds": 1,
            },
        ).json()
        # stop the run once a checkpoint exists, then resume it
        wait_for(lambda: (home / "runs/run1/checkpoints/step-0000002").is_dir(), 180, 0.2, "the first checkpoint")
        stop = client.post("/api/runs/run1/stop")
        assert stop.status_code == 200, stop.text
        stopped = wait_for(lambda: ended(client, run.json()["job"]["id"]), 60, 0.2, "the run to stop")
        view = client.get("/api/runs/run1").json()
        resume = client.post("/api/runs/run1/resume")
        demo = client.post("/api/reports", json={"kind": "demo", "name": "demo1", "steps": 2, "samples": 4}).json()
        bench = client.post(
            "/api/reports",
            json={
                "kind": "bench",
                "name": "bench1",
                "size": "tiny",
                "seeds": 1,
                "steps": 2,
                "threads": 1,
                "settings": ["concept_lora"],
                "methods": ["sft"],
            },
        ).json()
        jobs = [resume.json()["job"]["id"], probe["job"]["id"], demo["job"]["id"], bench["job"]["id"]]
        for job_id in jobs:
            wait_for(lambda job_id=job_id: ended(client, job_id), 300, 0.3, f"job {job_id}")
        yield {
            "home": home,
            "ctx": ctx,
            "client": client,
            "stopped_job": stopped,
            "stopped_view": view,
            "resume_job": client.get(f"/api/jobs/{jobs[0]}").json(),
            "jobs": jobs,
        }
    finally:
        close_ctx(ctx)


# --- info, presets, settings ------------------------------------------------------------------------------------
def test_info_presets_settings(world):
    c = world["client"]
    info = c.get("/api/info").json()
    assert info["home"] == str(world["home"].resolve()) and "dopsd" in info["methods"]
    assert info["plan_available"] == adapter.has_command("plan")
    presets = c.get("/api/presets").json()
    assert {p["name"] for p in presets["presets"]} >= {"mini", "zimage-turbo"}
    mini = next(p for p in presets["presets"] if p["name"] == "mini")
    assert mini["form"]["optim.lr"] == 5e-4 and "Optimizer steps." in presets["help"]["train.max_steps"]
    assert c.put("/api/settings", json={"max_running": 0}).status_code == 400
    assert c.put("/api/settings", json={"max_running": 2}).json() == {"max_running": 2}
    assert json.loads((world["home"] / ".ui/settings.json").read_text())["max_running"] == 2


# --- configs ----------------------------------------------------------------------------------------------------
def test_config_form_yaml_and_errors(world):
    c = world["client"]
    r = c.post(
        "/api/config",
        json={
            "preset": "mini",
            "dataset": "mini-concept",
            "name": "x",
            "values": {
                "train.max_steps": 7,
                "method.name": "sft",
                "method.prior_prompts": ["a red circle"],
                "method.prior_weight": 1,
            },
        },
    )
    assert r.status_code == 200, r.text
    cfg = r.json()["config"]
    assert cfg["train"]["max_steps"] == 7 and cfg["method"]["name"] == "sft"
    assert cfg["method"]["prior_prompts"] == ["a red circle"]
    assert cfg["data"]["path"] == str(world["home"].resolve() / "datasets/mini-concept")
    assert cfg["train"]["output_dir"] == str(world["home"].resolve() / "runs/x")
    edited = r.json()["yaml"].replace("max_steps: 7", "max_steps: 9")
    assert c.post("/api/config", json={"yaml": edited}).json()["config"]["train"]["max_steps"] == 9
    bad = c.post("/api/config", json={"preset": "mini", "values": {"train.max_steps": "many"}})
    assert bad.status_code == 400 and "train.max_steps" in bad.json()["error"]
    assert c.post("/api/config", json={"preset": "mini", "values": {"train.output_dir": "/etc"}}).status_code == 400
    assert "not valid" in c.post("/api/config", json={"yaml": "model: [unclosed"}).json()["error"]
    assert "optim.lrr" in c.post("/api/config", json={"yaml": "optim: {lrr: 1}"}).json()["error"]


def test_plan_panel_follows_the_command(world):
    r = world["client"].post("/api/plan", json={"preset": "mini", "dataset": "mini-concept", "values": {}}).json()
    if adapter.has_command("plan"):
        assert r["available"] and ("plan" in r or "error" in r)
    else:
        assert r == {"available": False}


# --- runs -------------------------------------------------------------------------------------------------------
def test_stopped_run_then_resumed_to_the_end(world):
    stopped, view = world["stopped_job"], world["stopped_view"]
    assert stopped["status"] == "stopped"
    assert view["status"] in ("stopped", "aborted") and view["resumable"]
    assert view["checkpoints"] and 2 <= view["progress"]["step"] < 12
    # Stop is a SIGTERM the run answers: it finishes its step, checkpoints it (even between the intervals) and
    # exits 143 — no step trained before the stop is lost
    step = view["progress"]["step"]
    assert stopped["returncode"] == 143 and view["progress"]["status"] == "interrupted", (stopped, view["progress"])
    assert view["checkpoints"][-1] == f"step-{step:07d}"
    assert "stopped by SIGTERM after step" in (world["home"] / f".ui/logs/{stopped['id']}.log").read_text()
    assert world["resume_job"]["status"] == "succeeded", world["resume_job"]
    assert "--resume" in world["resume_job"]["argv"]
    run = world["client"].get("/api/runs/run1").json()
    assert run["status"] == "ok" and run["summary"]["resumed_from"]
    assert run["progress"]["step"] == 12 and run["losses"][-1]["step"] == 12
    assert not run["resumable"]


def test_run_view_has_losses_health_samples_files(world):
    c = world["client"]
    run = c.get("/api/runs/run1").json()
    assert {"loss", "lr", "step"} <= set(run["losses"][0]) and not any(
        k.startswith("rollout/") for k in run["losses"][0]
    )
    health = run["health"]
    assert health["source"] in ("health.jsonl", "tensorboard") and health["records"][0]["step"] == 0
    assert all(0.5 < r["health"] <= 1.5 for r in health["records"])
    done = run["done"]  # the done signal: a record per sampling, the lowest step and the earliest as good
    assert done["records"][0]["step"] == 0 and all(r["distance"] > 0 for r in done["records"])
    lowest = min(done["records"], key=lambda r: r["distance"])
    assert done["best_step"] == lowest["step"] and done["as_good_step"] <= done["best_step"]
    samples = run["samples"]
    assert samples["few_steps"] == 4 and samples["many_steps"] == 8
    assert samples["latest"]["few"]["file"] == "final_4steps.png"
    grid = c.get(f"/files/runs/run1/samples/{samples['latest']['few']['file']}")
    assert grid.status_code == 200 and grid.headers["content-type"] == "image/png"
    assert Image.open(io.BytesIO(grid.content)).size[0] > 100
    assert run["files"]["lora.safetensors"] == "/files/runs/run1/lora.safetensors"
    download = c.get(run["files"]["lora.safetensors"], params={"download": 1})
    assert download.status_code == 200 and "attachment" in download.headers["content-disposition"]
    listed = {r["name"]: r for r in c.get("/api/runs").json()["runs"]}
    assert listed["run1"]["status"] == "ok" and listed["run1"]["step"] == 12 and listed["run1"]["has_lora"]


def test_run_refusals(world):
    c = world["client"]
    assert c.post("/api/runs", json={"preset": "mini", "dataset": "mini-concept", "name": "run1"}).status_code == 409
    assert c.post("/api/runs", json={"preset": "mini", "dataset": "nope", "name": "r9"}).status_code == 404
    assert c.post("/api/runs/run1/stop").status_code == 409  # nothing running
    assert c.get("/api/runs/nope").status_code == 404
    assert c.post("/api/tryit", json={"steps": 0}).status_code == 400


def test_a_run_the_trainer_would_refuse_is_refused_before_it_is_queued(world):
    """The checks `dopsd train` runs first run before queueing: the reason comes back by field, nothing is
    written or queued."""
    c, home = world["client"], world["home"]
    empty = home / "datasets/empty-one"
    empty.mkdir()
    jobs_before = len(c.get("/api/jobs").json()["jobs"])
    r = c.post("/api/runs", json={"preset": "mini", "dataset": "empty-one", "name": "doomed", "values": FAST_RUN})
    assert r.status_code == 400 and "no images found" in r.json()["fields"]["dataset"], r.text
    nodata = c.post("/api/runs", json={"preset": "mini", "name": "doomed", "values": FAST_RUN})
    assert nodata.status_code == 400 and set(nodata.json()["fields"]) == {"dataset"}
    nomodel = c.post("/api/runs", json={"preset": "zimage-turbo", "dataset": "mini-concept", "name": "doomed"})
    fields = nomodel.json()["fields"]
    assert "model.pretrained is not set" in fields["model.pretrained"]
    assert "smaller than the minimum side" in fields["dataset"]  # the miniature's 24×24 images, for Z-Image
    for value, key in ((1e9, "train.max_steps"), (2.5, "lora.rank"), ("abc", "optim.lr")):
        bad = c.post("/api/runs", json={"preset": "mini", "dataset": "mini-concept", "values": {key: value}})
        assert bad.status_code == 400 and list(bad.json()["fields"]) == [key], bad.text
    assert len(c.get("/api/jobs").json()["jobs"]) == jobs_before
    assert not (home / "runs/doomed").exists() and not (home / "configs/runs-doomed.yaml").exists()


# --- probe, compare, export, reports, jobs ----------------------------------------------------------------------
def test_probe_result(world):
    c = world["client"]
    probe = c.get("/api/probes/probe1").json()
    assert probe["job"]["status"] == "succeeded", probe["job"]
    assert len(probe["probe"]["pairs"]) == 8 and probe["probe"]["counts"]["carries"] >= 1
    assert probe["grid"] == "/files/probes/probe1/probe_grid.png"
    assert set(probe["targets"]) == {p["name"] for p in probe["probe"]["pairs"]}
    assert c.get(probe["grid"]).status_code == 200
    assert c.get("/api/probes").json()["probes"][0]["name"] == "probe1"


def test_compare_before_and_after_on_the_same_noise(world):
    c = world["client"]
    bad = c.post("/api/compare", json={"runs": ["run1"], "prompts": ["x"], "seeds": ["a"]})
    assert bad.status_code == 400
    r = c.post("/api/compare", json={"runs": ["run1"], "prompts": ["a sks circle", "a red square"], "seeds": [0, 1]})
    assert r.status_code == 200, r.text
    cid = r.json()["id"]
    entries = wait_for(
        lambda: (lambda v: v if all(e["status"] in ("succeeded", "failed") for e in v) else None)(
            c.get(f"/api/compare/{cid}").json()["entries"]
        ),
        180,
        0.5,
        "the comparison",
    )
    assert [e["label"] for e in entries] == ["before", "run1"]
    assert all(e["status"] == "succeeded" and e["url"] for e in entries), entries
    images = [Image.open(io.BytesIO(c.get(e["url"]).content)).convert("RGB") for e in entries]
    assert images[0].size == images[1].size
    job = c.get(f"/api/jobs/{entries[0]['job']}").json()
    assert "--no-lora" in job["argv"] and job["argv"][job["argv"].index("--seeds") + 1 :][:2] == ["0", "1"]
    assert c.get("/api/compare").json()["comparisons"][0]["id"] == cid


def test_export_mini_reports_why_and_zimage_exports(world):
    c, home = world["client"], world["home"]
    write_zimage_lora_run(home / "runs/zi-run")
    # the miniature's LoRA loads only in dopsd (no interchange layout): not offered, and refused if asked
    assert c.get("/api/runs/run1").json()["export_formats"] == []
    mini = c.post("/api/runs/run1/export", json={"format": "comfyui"})
    assert mini.status_code == 400 and "loads only in dopsd" in mini.json()["error"]
    assert c.get("/api/runs/zi-run").json()["export_formats"] == ["diffusers", "comfyui"]
    started = [c.post("/api/runs/zi-run/export", json={"format": "comfyui"}) for _ in range(2)]
    assert all(r.status_code == 200 and not r.json()["job"]["queued"] for r in started)  # exports skip the queue
    for r in started:
        wait_for(lambda r=r: ended(c, r.json()["job"]["id"]), 90, 0.2, "the export")
    exports = c.get("/api/runs/zi-run").json()["exports"]
    files = sorted(e["file"] for e in exports)
    assert files == [
        "/files/exports/zi-run/zi-run_comfyui-2.safetensors",
        "/files/exports/zi-run/zi-run_comfyui.safetensors",
    ]
    from safetensors import safe_open

    data = c.get(files[0], params={"download": 1})
    target = home / "check.safetensors"
    target.write_bytes(data.content)
    with safe_open(str(target), "pt") as f:
        assert all(k.startswith("diffusion_model.layers.") for k in f.keys())
    assert c.post("/api/runs/zi-run/export", json={"format": "onnx"}).status_code == 400


def test_reports_demo_and_bench(world):
    c = world["client"]
    listed = {r["name"]: r["kind"] for r in c.get("/api/reports").json()["reports"]}
    assert listed == {"demo1": "demo", "bench1": "bench"}
    demo = c.get("/api/reports/demo1").json()
    assert demo["job"]["status"] == "succeeded" and set(demo["summary"]) >= {"before", "sft", "dopsd"}
    assert c.get(demo["image"]).status_code == 200
    bench = c.get("/api/reports/bench1").json()
    assert bench["job"]["status"] == "succeeded" and bench["html"] == "/files/reports/bench1/report.html"
    page = c.get(bench["html"])
    assert page.headers["content-security-policy"] == "sandbox allow-scripts"
    assert "--tiny" in bench["job"]["argv"] and set(bench["files"]) >= {"report.md", "results.json"}
    assert c.post("/api/reports", json={"kind": "bench", "size": "huge"}).status_code == 400
    assert c.post("/api/reports", json={"kind": "demo", "name": "demo1"}).status_code == 409


def test_jobs_list_view_and_cancel(world):
    c = world["client"]
    jobs = c.get("/api/jobs").json()
    assert len(jobs["jobs"]) >= 6 and jobs["jobs"][0]["id"] > jobs["jobs"][-1]["id"]
    view = c.get(f"/api/jobs/{world['jobs'][0]}").json()
    assert "lora.safetensors" in view["log"]  # the trainer's own output (it names the weights it wrote)
    assert c.get("/api/jobs/99999-x").status_code == 404
    assert c.post(f"/api/jobs/{world['jobs'][0]}/stop").json()["status"] == "succeeded"  # finished: unchanged


def test_tryit_writes_the_dataset_once_and_queues_a_run(tmp_path):
    ctx = make_ctx(tmp_path)
    c = TestClient(create_app(ctx), headers=HEADERS)
    try:
        r = c.post("/api/tryit", json={"steps": 3})
        assert r.status_code == 200, r.text
        assert r.json()["name"] == "mini-concept-dopsd"
        assert len(list((tmp_path / "datasets/mini-concept").glob("*.png"))) == 8
        cfg = c.get(f"/files/{r.json()['config']}")  # configs are not served
        assert cfg.status_code == 403
        second = c.post("/api/tryit", json={"steps": 3}).json()
        assert second["name"] == "mini-concept-dopsd-2"
        assert [d["name"] for d in c.get("/api/datasets").json()["datasets"]] == ["mini-concept"]
    finally:
        close_ctx(ctx)
    text = (tmp_path / "configs/runs-mini-concept-dopsd.yaml").read_text()
    assert "max_steps: 3" in text and "trigger_word: sks" in text
    assert not any(j.status == "running" for j in ctx.jobs.list())
    assert Path(tmp_path / ".ui/jobs.json").is_file()
