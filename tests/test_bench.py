"""`dopsd bench`: a tiny configuration end to end (real trainer, real metrics, tiny random miniature), and the
cost / report / adapter-merge building blocks on their own."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn

from dopsd.bench.continual import KEPT_PER_ROUND
from dopsd.bench.cost import count_flops, resident_bytes, transient_peak_bytes
from dopsd.bench.jobs import PRIOR_PROMPTS
from dopsd.bench.report import fmt
from dopsd.bench.results import REQUIRED_FIELDS, REQUIRED_METHODS, is_trained, validate_results

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def bench(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from dopsd.cli import main

    out = tmp_path_factory.mktemp("bench") / "report"
    assert main(["bench", "--tiny", "--out", str(out)]) == 0
    return out


def test_results_json_complete_and_consistent(bench: Path) -> None:
    results = json.loads((bench / "results.json").read_text())
    assert set(results) == {"concept_lora", "domain_full", "continual"}
    assert validate_results(results) == []
    for name, block in results.items():
        if name == "continual":
            continue
        methods, setting = block["methods"], block["setting"]
        assert set(REQUIRED_METHODS) | {"dopsd_velocity"} <= set(methods)
        assert ("dopsd_prior" in methods) == (name == "concept_lora")  # prior preservation: concepts only
        assert setting["optimizer_steps"] == 4 and setting["seeds"] == 3
        for method, row in methods.items():
            assert set(REQUIRED_FIELDS) <= set(row)
            for key in ("concept_fidelity", "unseen_prompt_fidelity", "preservation", "fewstep_quality"):
                assert 0.0 <= row[key] <= 1.0, (name, method, key)
            if not is_trained(method):
                assert row["sec_per_step"] is None and row["peak_mem_mb"] is None
                continue
            seeds = 3 if method in ("sft", "sft_adapter", "dopsd") else 1  # the ablations and baselines: 1
            assert row["seeds"] == seeds and row["runs"] == seeds and row["steps"] == 4
            assert row["sec_per_step"] > 0 and row["peak_mem_mb"] > 0
            # ratios are what they claim to be, against SFT measured in the same run
            assert row["time_ratio_vs_sft"] == pytest.approx(row["sec_per_step"] / methods["sft"]["sec_per_step"])
            assert row["overhead_vs_flops"] == pytest.approx(row["time_ratio_vs_sft"] / row["flop_ratio_vs_sft"])
            assert row["drift"] > 0  # training changed the network
        # the untouched turbo is its own reference: zero drift, full agreement
        assert methods["base"]["drift"] == 0.0 and methods["base"]["preservation"] == 1.0
        assert methods["sft"]["flop_ratio_vs_sft"] == 1.0
        # the done signal per run: the earliest step as good as the lowest, from the per-sample distances
        rows = setting["done_signal"]
        assert rows and all(isinstance(r["as_good_step"], int) and r["as_good_step"] <= r["done_step"] for r in rows)
        # D-OPSD trains 1 of its K=4 roll-out states (method.train_states): one student fwd+bwd and teacher forward,
        # three forwards without a graph (off-policy: the teacher's) vs one SFT fwd+bwd. The arithmetic the
        # formula implies is what the FLOP counter sees over a whole optimizer step; with prior preservation
        # (concepts) its roll-out on the prior prompts too.
        for method in ("dopsd", "offpolicy") + (("dopsd_prior",) if name == "concept_lora" else ()):
            counted = methods[method]["flops_per_step"] / methods["sft"]["flops_per_step"]
            assert methods[method]["flop_ratio_vs_sft"] == pytest.approx(counted, rel=1e-6)
        assert 2.0 < methods["dopsd"]["flop_ratio_vs_sft"] < 4.0
        assert methods["sft_adapter"]["flop_ratio_vs_sft"] == pytest.approx(1.0)
        # the baselines: PSO samples references (4 forwards) and runs the pair with gradient and the frozen model
        # without; DreamBooth two SFT passes; SFT on teacher samples: 4 teacher forwards and one fwd+bwd
        assert methods["dreambooth"]["flop_ratio_vs_sft"] == pytest.approx(2.0)
        assert methods["pso"]["flop_ratio_vs_sft"] > 2.0 and methods["sft_teacher"]["flop_ratio_vs_sft"] > 1.0
        for method in ("pso", "dreambooth", "offpolicy", "sft_teacher"):  # baselines: the ablations' seed count
            assert methods[method]["seeds"] == 1 and methods[method]["steps"] == 4


def test_continual_setting_rounds(bench: Path) -> None:
    """Every continual method ran both rounds from the same untouched start; the table and the claim say so."""
    block = json.loads((bench / "results.json").read_text())["continual"]
    assert block["setting"]["kind"] == "continual" and block["setting"]["sequences"] == [["orange", "teal"]]
    assert set(block["methods"]) == {"sft", "sft_prior", "pso", "dopsd", "dopsd_prior"}
    starts = set()
    for method, sequences in block["methods"].items():
        rounds = sequences["orange>teal"]["rounds"]
        assert [r["round"] for r in rounds] == [0, 1, 2] and [r["target"] for r in rounds] == [None, "orange", "teal"]
        assert rounds[0]["retention"] is None and rounds[1]["retention"] is None
        assert set(rounds[2]["retention_by_target"]) == {"orange"}
        assert rounds[2]["retention"] == pytest.approx(rounds[2]["retention_by_target"]["orange"])
        for r in rounds:
            for key in ("new_fidelity", "fewstep_quality", "preservation", "unrelated_accuracy"):
                assert 0.0 <= r[key] <= 1.0, (method, r["round"], key)
        assert rounds[1]["drift"] > 0 and rounds[2]["drift"] > 0  # each round trained something
        starts.add(json.dumps({k: rounds[0][k] for k in ("fewstep_quality", "preservation", "new_fidelity")}))
        # round 2 started from round 1's run (train.init_from) and recorded that lineage
        work = bench / "work" / "continual" / f"orange-teal-{method}-0"
        summary = json.loads((work / "round2-teal" / "summary.json").read_text())
        assert summary["lineage"][0]["from"] == str((work / "round1-orange").resolve())
        # with prior preservation, round 2 also keeps round 1's training captions (its concept) on-policy
        prior = [prior_prompts(work / f"round{r}") for r in ("1-orange", "2-teal")]
        folder = bench / "data" / "continual" / "orange-teal" / "0-orange"
        orange = sorted({line for f in folder.glob("*.txt") for line in f.read_text().splitlines() if line})
        if method.endswith("_prior"):
            assert prior[0] == PRIOR_PROMPTS and prior[1] == PRIOR_PROMPTS + orange[:KEPT_PER_ROUND]
        else:
            assert prior == [[], []]
    assert len(starts) == 1  # the untouched model, measured alike for every method
    md = (bench / "report.md").read_text().split("## Setting: continual")[1]
    assert "### Sequence orange>teal" in md and md.count("| `dopsd_prior` |") == 3
    claims = [c for c in json.loads((bench / "claims.json").read_text()) if c["setting"] == "continual"]
    assert len(claims) == 1 and "sft:" in claims[0]["evidence"] and "dopsd:" in claims[0]["evidence"]


def prior_prompts(run: Path) -> list[str]:
    return yaml.safe_load((run / "config.yaml").read_text())["method"]["prior_prompts"]


def test_report_markdown_html_and_figures(bench: Path) -> None:
    md = (bench / "report.md").read_text()
    page = (bench / "report.html").read_text()
    results = json.loads((bench / "results.json").read_text())
    for name, block in results.items():
        assert f"## Setting: {name}" in md
        if name == "continual":
            continue
        section = md.split(f"## Setting: {name}")[1].split("## Setting:")[0]
        for method, row in block["methods"].items():
            line = next(l for l in section.splitlines() if l.startswith(f"| `{method}` |"))
            assert fmt(row["concept_fidelity"], row["concept_fidelity_std"]) in line  # table matches the JSON
    images = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md)
    grids = sum(len(block["methods"]) for name, block in results.items() if name != "continual")  # one per method
    assert len(images) == 2 * (1 + 1) + grids  # per setting: curves, methods side by side; then the grids
    for rel in images:
        assert (bench / rel).is_file() and (bench / rel).read_bytes()[:4] == b"\x89PNG"
    assert page.count("data:image/png;base64,") == len(images)  # self-contained
    assert not re.search(r"src=['\"](?!data:)", page)
    for field in REQUIRED_FIELDS:
        assert f"`{field}`" in md  # every field documented with its direction
    claims = json.loads((bench / "claims.json").read_text())
    assert claims and all(c["verdict"].split()[0] in ("reproduced", "not", "inconclusive") for c in claims)
    curves = json.loads((bench / "curves.json").read_text())
    for name in ("concept_lora", "domain_full"):
        runs = curves[name]["metrics"]["concept_fidelity"]["dopsd"]
        assert len(runs) >= 3 and all(len(r) == len(curves[name]["steps"]) for r in runs)


def test_refuses_non_empty_out(tmp_path: Path) -> None:
    from dopsd.cli import main

    (tmp_path / "keep.txt").write_text("x")
    assert main(["bench", "--tiny", "--out", str(tmp_path)]) == 2
    assert [p.name for p in tmp_path.iterdir()] == ["keep.txt"]


def test_validate_results_names_what_is_missing() -> None:
    row = {f: 0.5 for f in REQUIRED_FIELDS} | {"seeds": 3}
    base = {f: 0.5 for f in REQUIRED_FIELDS} | {"seeds": 1, "sec_per_step": None, "peak_mem_mb": None}
    good = {"s": {"setting": {}, "methods": {m: dict(row) for m in REQUIRED_METHODS} | {"base": base}}}
    assert validate_results(good) == []
    bad = json.loads(json.dumps(good))
    del bad["s"]["methods"]["dopsd_live_teacher"]
    del bad["s"]["methods"]["sft"]["preservation"]
    bad["s"]["methods"]["dopsd"]["fewstep_quality"] = float("nan")
    problems = " ".join(validate_results(bad))
    assert "dopsd_live_teacher" in problems and "preservation" in problems and "fewstep_quality" in problems


def test_flop_counter_counts_linear_and_cpu_attention() -> None:
    lin = nn.Linear(16, 32)
    x = torch.randn(8, 16)
    assert count_flops(lambda: lin(x)) == 2 * 8 * 16 * 32
    q = torch.randn(2, 4, 10, 8)
    attn = count_flops(lambda: nn.functional.scaled_dot_product_attention(q, q, q))
    assert attn == 2 * (2 * 2 * 4 * 10 * 10 * 8)  # QKᵀ and AV; torch's own counter gives 0 for the CPU kernel


def test_memory_measurement() -> None:
    w = torch.zeros(256, 256)
    assert resident_bytes([w, w[:10], w.t()]) == w.numel() * 4  # views counted once
    size = 512 * 512 * 4

    def alloc() -> None:
        a = torch.ones(512, 512)
        b = a * 2  # two live at once, then freed
        del a, b

    peak = transient_peak_bytes(alloc)
    assert 2 * size <= peak < 3 * size


def test_dedistill_deltas_merge_and_remove_exactly() -> None:
    from dopsd.bench.suite import add_deltas, lora_deltas, without_deltas
    from dopsd.lora.inject import add_lora, lora_state_dict

    net = nn.Sequential(nn.Linear(6, 6), nn.Linear(6, 6))
    add_lora(net, ["0", "1"], rank=2, alpha=4)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if "lora_B" in name:
                p.normal_()
    x = torch.randn(3, 6)
    state = lora_state_dict(net)
    deltas = lora_deltas(state, scale=2.0)
    plain = nn.Sequential(nn.Linear(6, 6), nn.Linear(6, 6))
    plain.load_state_dict({k.replace("base_layer.", ""): v for k, v in net.state_dict().items() if "lora_" not in k})
    before = plain(x)
    add_deltas(plain, deltas, +1.0)
    assert torch.allclose(plain(x), net(x), atol=1e-5)  # merged ΔW = the LoRA's effect
    with without_deltas(plain, deltas):
        assert torch.allclose(plain(x), before, atol=1e-5)
    assert torch.allclose(plain(x), net(x), atol=1e-5)


def test_claim_verdicts_follow_the_stated_criteria() -> None:
    from dopsd.bench.claims import check_setting

    def row(q: float, q_std: float, fid: float = 0.9) -> dict:
        return {
            "fewstep_quality": q,
            "fewstep_quality_std": q_std,
            "manystep_quality": 0.99,
            "concept_fidelity": fid,
            "concept_fidelity_std": 0.01,
            "attribute_accuracy": 0.95,
        }

    def verdict(rows: dict, claim: str) -> str:
        return next(c["verdict"] for c in check_setting("concept_lora", rows, {}) if c["claim"].startswith(claim))

    blurred = {"base": row(0.95, 0.0, 0.05), "sft": row(0.80, 0.02), "dopsd": row(0.94, 0.01)}
    assert verdict(blurred, "SFT lowers few-step quality") == "reproduced"
    assert verdict(blurred, "SFT's damage is few-step specific") == "reproduced"
    assert verdict(blurred, "D-OPSD keeps the few-step quality") == "reproduced"
    noisy = {"base": row(0.95, 0.0, 0.05), "sft": row(0.90, 0.05), "dopsd": row(0.80, 0.01)}
    assert verdict(noisy, "SFT lowers few-step quality") == "not reproduced"  # Δ −0.05 within 2×std
    assert verdict(noisy, "D-OPSD keeps the few-step quality") == "not reproduced"


def test_a_diverged_run_does_not_take_the_report_down() -> None:
    """Means and spreads skip non-finite values (a collapsed run); all non-finite gives NaN, not a crash."""
    import math
    import statistics

    from dopsd.bench.aggregate import _mean_std

    assert _mean_std([1.0, math.nan, 3.0]) == (2.0, statistics.stdev([1.0, 3.0]))
    assert _mean_std([0.5, math.inf]) == (0.5, 0.0)
    assert all(math.isnan(v) for v in _mean_std([math.nan, math.nan]))


def _files(folder: Path) -> dict[Path, int]:
    return {p: p.stat().st_mtime_ns for p in folder.rglob("*") if p.is_file()}


def test_resume_runs_only_the_unfinished_jobs(bench: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    import shutil

    from dopsd.cli import main

    out = tmp_path / "report"
    shutil.copytree(bench, out)
    saved = sorted((out / "work").rglob("*.result.pt"))
    lost = next(p for p in saved if p.name.endswith("-sft-1.result.pt"))
    kept = {p: p.stat().st_mtime_ns for p in saved if p != lost}
    lost.unlink()  # an interrupted run: this job never finished, the report was never written
    (out / "results.json").unlink()
    capsys.readouterr()
    assert main(["bench", "--tiny", "--out", str(out), "--resume"]) == 0
    log = capsys.readouterr().out
    assert f"resuming: {len(kept)} finished job(s) kept" in log
    ran = re.findall(r"^\[\d+/\d+\] (.*?):", log, re.M)
    assert len(ran) == 1 and ran[0].endswith("sft seed 1"), log
    assert lost.is_file() and {p: p.stat().st_mtime_ns for p in kept} == kept  # finished jobs untouched
    # the report holds every run again, and the re-run job reproduced the lost one (same seeds, same numbers)
    new, old = (json.loads((d / "results.json").read_text()) for d in (out, bench))
    assert validate_results(new) == []
    for setting in ("concept_lora", "domain_full"):
        for key in ("concept_fidelity", "fewstep_quality", "drift"):
            assert new[setting]["methods"]["sft"][key] == pytest.approx(old[setting]["methods"]["sft"][key])


def test_resume_with_other_options_changes_nothing(bench: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    import shutil

    from dopsd.cli import main

    out = tmp_path / "report"
    shutil.copytree(bench, out)
    before = _files(out)
    capsys.readouterr()
    assert main(["bench", "--tiny", "--out", str(out), "--resume", "--steps", "3"]) == 2
    message = capsys.readouterr().out
    assert "was made with other settings" in message and "steps" in message and "--out" in message
    assert _files(out) == before


def test_two_worker_processes_and_resume(tmp_path: Path) -> None:
    """The quick/full presets run jobs in two spawned worker processes (the adapter job first, the adapter users
    after it): the same results as one process, and resuming that run trains nothing again."""
    import dataclasses

    from dopsd.bench.run import run_bench
    from dopsd.bench.settings import preset

    cfg = preset("tiny").override(settings=["concept_lora"], methods=["base", "sft", "sft_adapter"], seeds=1)
    one = run_bench(cfg, tmp_path / "one", log=lambda _: None)
    lines: list[str] = []
    two = run_bench(dataclasses.replace(cfg, workers=2), tmp_path / "two", log=lines.append)
    assert sum(line.startswith("[") for line in lines) == 4  # adapter + base, sft, sft_adapter
    for method in ("base", "sft", "sft_adapter"):
        for key in ("concept_fidelity", "fewstep_quality", "drift"):
            assert two["rows"]["concept_lora"][method][key] == pytest.approx(one["rows"]["concept_lora"][method][key])
    lines.clear()
    run_bench(dataclasses.replace(cfg, workers=2), tmp_path / "two", log=lines.append, resume=True)
    assert "resuming: 4 finished job(s) kept" in lines[1] and not any(line.startswith("[") for line in lines)


def test_weights_option_benchmarks_a_recipe_folder(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """`--weights DIR` runs the bench on a recipe's output instead of the shipped weights; a folder that holds no
    miniature weights is refused with one line naming it, before any work."""
    from dopsd.cli import main

    weights = tmp_path / "w"
    assert main(["mini", "recipe", "--tiny", "--out", str(weights)]) == 0
    capsys.readouterr()
    bad = tmp_path / "bad"
    assert main(["bench", "--tiny", "--weights", str(tmp_path / "nowhere"), "--out", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "--weights: no miniature weights at" in err and "nowhere" in err and "Traceback" not in err
    assert not bad.exists()

    out = tmp_path / "b"
    argv = ["bench", "--tiny", "--weights", str(weights), "--settings", "domain_full", "--methods", "sft"]
    assert main(argv + ["--out", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["domain_full"]["setting"]["model"] == str(weights.resolve())
