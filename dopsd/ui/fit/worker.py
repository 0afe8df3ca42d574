"""`python -m dopsd.ui.fit.worker`: the app's plan process. It imports torch and the planner once and answers
"will it fit?" for one config at a time: JSON lines in on stdin ({"id", "yaml"}), JSON lines out on stdout.

For each request it plans only the configured method (the planner's phases of that method, not all three), in
two stages so the page can show the first while the second runs:

  base   the run peak (training, feature caching, sampling) and its breakdown, and which cards it fits
  card   for each card it does not fit, the planner's search for the fewest changes that make it fit (the
         same order of preference and the same candidates as `dopsd plan`), largest card first
  done   (or error, with the message the command would print)

Cheaper than `dopsd plan` for the same answers: the measurements are the planner's own (dopsd.planner.plan's
Planner), but an 8-bit optimizer re-measures only the optimizer phase (the only one it changes) and the feature
caching is measured once when the denoiser is not loaded during caching (its quantization then changes nothing
there). The app kills this process to cancel a request; it also exits when the app does (its parent changes).
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
import traceback
from dataclasses import replace
from typing import Any, Callable

import torch
import yaml

from dopsd.config import ConfigError
from dopsd.config import load as config_load
from dopsd.errors import DopsdError
from dopsd.models.registry import plan_spec
from dopsd.planner.auto import planned_method
from dopsd.planner.caching import caching_peaks
from dopsd.planner.measure import PHASES, measure
from dopsd.planner.plan import Choice, Planner, choice_from_config
from dopsd.planner.resident import GiB
from dopsd.planner.search import CARDS, CUDA_CONTEXT, candidates, fits

PHASES_OF = {"sft": ("sft", "optim"), "dopsd": ("rollout", "optim"), "dopsd_prior": ("rollout", "prior", "optim")}
BREAKDOWN = (  # (label, the `Resident` attribute): the bytes the run holds throughout, as the trainer holds them
    ("frozen weights", "frozen"),
    ("trainable weights (LoRA or all)", "trainable"),
    ("gradients", "grads"),
    ("optimizer state", "optimizer"),
    ("EMA teacher shadow", "ema"),
    ("prior shadow", "prior"),
    ("parts kept loaded (VAE)", "kept"),
)


def _round(x: float) -> float:
    """4 significant digits: the plan is a prediction, not a measurement to the byte."""
    return float(f"{x:.4g}")


class FitPlanner(Planner):
    """The planner, with an 8-bit optimizer re-measuring only the optimizer phase (the only one it changes)."""

    def measured(self, c: Choice) -> dict:
        if not c.eight_bit or "optim" not in (self.only or PHASES):
            return super().measured(c)
        rest = super().measured(replace(c, eight_bit=False))
        rank = c.lora_rank if c.lora_rank is None or self.cfg.lora.rank <= c.lora_rank else self.cfg.lora.rank
        key = (c.height, c.width, c.batch, c.gradient_checkpointing, rank, True)
        if key not in self.phases:
            s = self.setting(Choice(c.height, c.width, c.batch, c.gradient_checkpointing, rank, True, "none"))
            self.phases[key] = {**rest, "optim": measure(self.spec, s, True, self.exact, ("optim",))["optim"]}
        return self.phases[key]


def answer(cfg: Any, emit: Callable[[str, dict], None]) -> None:
    """The answer for `cfg`, as events (see the module docstring)."""
    try:
        spec = plan_spec(cfg.model, f"{cfg.preset} {cfg.model.pretrained or ''}")
        c = choice_from_config(cfg)
        spec.latent_shape(c.height, c.width)
    except (ValueError, FileNotFoundError) as err:
        raise ConfigError(str(err)) from err
    method = planned_method(cfg.method)
    planner = FitPlanner(cfg, spec, "gpu", None, only=PHASES_OF[method])
    needed = "latents" if method == "sft" else "teacher"
    denoiser_in_caching = any(spec.denoiser in s.resident or spec.denoiser in s.uses for s in spec.caching)
    cached: dict[str, float] = {}

    def cache_peak(choice: Any) -> float:
        # keyed as the planner's search keys it (by quantization only: a lower resolution reuses the configured
        # one's, which errs on the safe side); measured once when the denoiser is not loaded while caching
        key = choice.quantize if denoiser_in_caching else "any"
        if key not in cached:
            stages = caching_peaks(spec, choice, planner.target)["stages"]
            cached[key] = max(s["peak"] for s in stages if s["needed_by"] in ("student", needed))
        return cached[key]

    def run_peaks(choice: Any) -> tuple[float, float, float]:
        return planner.peaks(choice)[method]["peak"], cache_peak(choice), planner.sampling(choice)[method]

    train, caching, sampling = run_peaks(c)
    run = max(train, caching, sampling)
    r, p = planner.resident(c), planner.peaks(c)[method]
    shown = {"ema": method != "sft", "prior": method == "dopsd_prior"}
    rows = [(label, getattr(r, attr)) for label, attr in BREAKDOWN if shown.get(attr, True)]
    rows.append(("step peak above the resident bytes (activations, …)", p["step"]))
    if r.quant_scratch:
        rows.append(("  of it: dequantization scratch", r.quant_scratch))
    gb = lambda x: _round(x / GiB)  # noqa: E731
    auto = cfg.train.gradient_checkpointing == "auto"
    emit(
        "base",
        {
            "model": spec.label,
            "method": cfg.method.name,
            "planned_as": method,
            "settings": c.label() + (" (checkpointing: auto)" if auto else ""),
            "resolution": [c.height, c.width],
            "peaks_gb": {"training": gb(train), "caching": gb(caching), "sampling": gb(sampling), "run": gb(run)},
            "breakdown_gb": [[label, gb(v)] for label, v in rows],
            "context_gb": gb(CUDA_CONTEXT),
            "cards": {str(card): {"card": card, "fits": fits(run, card)} for card in CARDS},
        },
    )
    for card in sorted(CARDS, reverse=True):  # the larger cards need fewer changes: their answers come first
        if fits(run, card):
            continue
        found: dict[str, Any] = {"card": card, "fits": False, "changes": None}
        best = cache_peak(replace(c, quantize="nf4") if c.lora_rank else c)
        if not fits(best, card):  # no setting the search tries changes the encoders
            found["reason"] = f"feature caching alone needs {best / GiB:.1f} GB (the largest encoder with the VAE)"
        else:
            for changes, cand in candidates(planner, c):
                t = planner.peaks(cand)[method]["peak"]
                if not fits(max(t, cache_peak(cand)), card):
                    continue
                s = planner.sampling(cand)[method]  # last: only for candidates that fit so far
                if fits(s, card):
                    found.update(changes=changes, peak_gb=gb(max(t, cache_peak(cand), s)), settings=cand.label())
                    if auto and changes == ["train.gradient_checkpointing=true"]:
                        found["auto"] = True  # `auto` turns it on by itself on this card
                    break
            else:
                found["reason"] = "nothing within 3 changes of the settings the search tries"
        emit("card", found)


def _watch_parent() -> None:
    """Exit when the app does (killed or not): its child would otherwise finish a plan for nobody."""
    parent = os.getppid()

    def loop() -> None:
        while True:
            time.sleep(1.0)
            if os.getppid() != parent:
                os._exit(0)

    threading.Thread(target=loop, daemon=True).start()


def main() -> int:
    _watch_parent()
    torch.set_num_threads(max(1, int(os.environ.get("DOPSD_THREADS") or 1)))
    out = sys.stdout
    print(json.dumps({"event": "ready", "pid": os.getpid()}), file=out, flush=True)
    for line in sys.stdin:
        try:
            request = json.loads(line)
        except ValueError:
            continue
        rid, started = request.get("id"), time.time()

        def emit(event: str, data: dict, rid: Any = rid) -> None:
            print(json.dumps({"id": rid, "event": event, "data": data}), file=out, flush=True)

        try:
            cfg = config_load.from_dict(yaml.safe_load(request["yaml"]) or {}, "the config")
            config_load.validate(cfg)
            answer(cfg, emit)
            emit("done", {"seconds": round(time.time() - started, 1)})
        except DopsdError as err:
            emit("error", {"message": str(err)})
        except Exception as err:  # noqa: BLE001 - a planner bug: said on the page, the details on stderr
            traceback.print_exc()
            emit("error", {"message": f"the plan failed ({type(err).__name__}: {err})"})
    return 0


if __name__ == "__main__":
    sys.exit(main())
