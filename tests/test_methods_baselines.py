"""The paper's baselines as training methods (pso, dreambooth, offpolicy, sft_teacher): each trains on the tiny
miniature with finite, sane losses, resumes bit-exactly from a middle checkpoint, and wrong options are refused."""

import math
import shutil

import pytest
import torch
from conftest import tiny_config
from safetensors.torch import load_file

import dopsd
from dopsd.config import ConfigError, load_config
from dopsd.core.sampler import inference_mode
from dopsd.mini.adapter import tiny_random_adapter

# Caption dropout and LoRA dropout: draws that a resume must reproduce too.
COMMON = {"train.max_steps": 4, "train.checkpoint_every": 2, "data.caption_dropout": 0.3, "lora.dropout": 0.1}
METHOD_OPTIONS = {
    "pso": {"method.name": "pso"},
    "pso_hinge": {"method.name": "pso", "method.pso_form": "hinge"},
    "dreambooth": {"method.name": "dreambooth", "method.class_images": 6},
    "offpolicy": {"method.name": "offpolicy"},
    "sft_teacher": {"method.name": "sft_teacher"},
}
LOGGED = {
    "pso": "pso/margin",
    "pso_hinge": "pso/implicit_acc",
    "dreambooth": "class",
    "offpolicy": "offpolicy",
    "sft_teacher": "sft_teacher",
}


def adapter():
    return tiny_random_adapter(0, teacher_context="reference")


@pytest.mark.parametrize("method", list(METHOD_OPTIONS))
def test_method_trains_and_resumes_bit_exactly(tmp_path, concept_data, method):
    options = {**COMMON, **METHOD_OPTIONS[method]}
    full = dopsd.train(
        tiny_config(tmp_path, concept_data, **options, **{"train.output_dir": tmp_path / "full"}), adapter=adapter()
    )
    assert len(full.losses) == 4 and all(math.isfinite(x) for x in full.losses)
    assert max(full.losses) < 10 * full.losses[0]  # sane: no blow-up in a few steps
    assert all(LOGGED[method] in r for r in full.history)
    assert full.summary["method"] == METHOD_OPTIONS[method]["method.name"] and full.summary["status"] == "ok"
    cut = tmp_path / "cut"  # the same run as if it had stopped right after its step-2 checkpoint
    shutil.copytree(full.output_dir, cut)
    shutil.rmtree(cut / "checkpoints" / "step-0000004")
    for name in ("lora.safetensors", "lora_config.json", "summary.json"):
        (cut / name).unlink()
    resumed = dopsd.train(
        tiny_config(tmp_path, concept_data, **options, **{"train.output_dir": cut}), resume=True, adapter=adapter()
    )
    assert resumed.summary["resumed_from"].endswith("step-0000002")
    assert resumed.losses == full.losses  # bit-exact
    a, b = load_file(str(full.weights)), load_file(str(resumed.weights))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_pso_loss_falls_over_a_longer_run(tmp_path, concept_data):
    """Online PSO fits its targets: the target error falls (the references move with the model, so the pair
    loss itself is not monotone)."""
    cfg = tiny_config(
        tmp_path,
        concept_data,
        **{"method.name": "pso", "train.max_steps": 16, "optim.lr": 3e-3, "train.checkpoint_every": 0},
    )
    run = dopsd.train(cfg, adapter=adapter())
    errors = [r["pso/target_error"] for r in run.history]
    assert sum(errors[-4:]) < sum(errors[:4])


def test_dreambooth_class_prompts_drop_the_trigger_word():
    from dopsd.methods.baselines import class_prompts

    cfg = load_config("mini", ["data.trigger_word=sks", "method.name=dreambooth"])
    got = class_prompts(
        cfg.method, cfg.data, ["a sks circle on a gray background", "a sks square", "a sks circle on a gray background"]
    )
    assert got == ["a circle on a gray background", "a square"]
    cfg = load_config("mini", ["method.name=dreambooth", "method.class_prompts=[a circle]"])
    assert class_prompts(cfg.method, cfg.data, ["a sks square"]) == ["a circle"]


def test_dreambooth_class_images_are_the_starting_models_samples(tmp_path, concept_data):
    """The class images are the untouched model's own few-step samples of the class prompts."""
    from dopsd.core.sampler import sample_euler
    from dopsd.data.dataset import load_dataset
    from dopsd.training.trainer import Trainer

    cfg = tiny_config(
        tmp_path,
        concept_data,
        **{"method.name": "dreambooth", "method.class_images": 3, "method.class_prompts": ["a circle", "a square"]},
    )
    untouched = adapter()
    ctx = untouched.collate(untouched.student_contexts(["a circle", "a square", "a circle"]))
    trainer = Trainer(cfg, tmp_path / "run", load_dataset(cfg.data, cfg.model), adapter=adapter())
    trainer.prepare()
    pool = trainer.terms[1].pool
    from dopsd.core.sampler import seed_noise
    from dopsd.methods.baselines import CLASS_KEY
    from dopsd.methods.terms import slot_rng

    noise = seed_noise(
        (3, 24, 24) if pool.shape[1:] == (3, 24, 24) else tuple(pool.shape[1:]),
        [int(slot_rng(cfg.train.seed, CLASS_KEY, i).integers(2**62)) for i in range(3)],
    )
    with torch.no_grad():
        expected = sample_euler(
            lambda x, s, c: untouched.velocity(untouched.network, x, s, c),
            noise,
            untouched.inference_schedule(24, 24),
            ctx,
        )
    torch.testing.assert_close(pool, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "overrides, words",
    [
        (["method.name=pso", "method.pso_form=sigmoid"], "method.pso_form"),
        (["method.name=pso", "method.pso_beta=0"], "method.pso_beta"),
        (["method.name=dreambooth", "method.class_images=0"], "method.class_images"),
        (["method.name=sft", "method.class_prompts=[a circle]"], "method.class_prompts"),
        (["method.name=dreambooth", "model.editing=true", "data.source_dir=/tmp"], "dreambooth"),
        (["method.name=offpolicyy"], "method.name"),
    ],
)
def test_wrong_options_are_refused(overrides, words):
    with pytest.raises(ConfigError, match=words.replace(".", r"\.")):
        load_config("mini", overrides)


def test_samples_drawn_during_training_are_drawn_as_at_inference():
    """PSO's references and DreamBooth's class images: no gradient, dropout off, the training flag restored."""
    net = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Dropout(0.5)).train()
    x = torch.randn(16, 8)
    assert not torch.equal(net(x), net(x))  # dropout is on while training
    with inference_mode(net):
        a, b = net(x), net(x)
    assert torch.equal(a, b) and not a.requires_grad and net.training
