"""LoRA file layouts without real models: the miniature's dopsd-only file, exact fused q/k/v conversions."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from dopsd.cli import main as cli
from dopsd.lora.layout import LoraFileError, from_interchange, split_keys, to_interchange

torch.set_num_threads(1)


def _trained_mini(tiny_adapter, seed: int = 0):
    from dopsd.lora.inject import add_lora

    add_lora(tiny_adapter.network, tiny_adapter.default_lora_targets(), 4, 8.0)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in tiny_adapter.network.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return tiny_adapter


def test_miniature_lora_is_dopsd_only_and_labelled(tiny_adapter, tmp_path, capsys):
    from dopsd.lora.inject import lora_state_dict
    from dopsd.lora.trained import apply_trained, save_trained
    from dopsd.mini.adapter import tiny_random_adapter

    adapter = _trained_mini(tiny_adapter)
    run = tmp_path / "run"
    run.mkdir()
    lora = {"rank": 4, "alpha": 8.0, "targets": adapter.default_lora_targets()}
    written = save_trained(run, adapter.network, lora, {"family": "mini", "method": "dopsd", "steps": 7})
    state = load_file(written)
    assert written.name == "lora.safetensors" and all(v.dtype == torch.float32 for v in state.values())
    assert state.keys() == lora_state_dict(adapter.network).keys()  # bare peft keys, as dopsd reads them
    with safe_open(str(written), "pt") as fh:
        md = fh.metadata()
    assert (
        md["modelspec.architecture"] == "dopsd-miniature/lora" and "loads only in dopsd" in md["modelspec.description"]
    )
    assert json.loads(md["dopsd"])["layout"] == "dopsd-peft" and md["ss_network_alpha"] == "8.0"
    fresh = tiny_random_adapter(0)
    apply_trained(fresh.network, written)
    assert all(torch.equal(v, lora_state_dict(adapter.network)[k]) for k, v in lora_state_dict(fresh.network).items())
    assert cli(["export", str(run), "--out", str(tmp_path / "x.safetensors")]) == 2
    err = capsys.readouterr().err
    assert "miniature" in err and "nothing to export" in err and not (tmp_path / "x.safetensors").exists()
    with pytest.raises(SystemExit) as exit_:  # argparse: the miniature is not a family to export for
        cli(["export", str(run), "--out", str(tmp_path / "x.safetensors"), "--model", "mini"])
    assert exit_.value.code == 2 and "invalid choice: 'mini'" in capsys.readouterr().err


def _pair(rank: int, out: int, inp: int, g: torch.Generator):
    return torch.randn(rank, inp, generator=g), torch.randn(out, rank, generator=g)


def test_flux2_layout_round_trip_is_exact_and_deltas_match():
    g = torch.Generator().manual_seed(0)
    modules = {f"transformer_blocks.0.attn.{n}": _pair(3, 8, 8, g) for n in ("to_q", "to_v", "add_k_proj", "to_out.0")}
    modules["single_transformer_blocks.1.attn.to_qkv_mlp_proj"] = _pair(3, 40, 8, g)
    state = to_interchange(modules, "flux2")
    assert set(state) == {
        f"diffusion_model.{n}.lora_{x}.weight"
        for x in "AB"
        for n in (
            "double_blocks.0.img_attn.qkv",
            "double_blocks.0.txt_attn.qkv",
            "double_blocks.0.img_attn.proj",
            "single_blocks.1.linear1",
        )
    }
    qkv_delta = (
        state["diffusion_model.double_blocks.0.img_attn.qkv.lora_B.weight"]
        @ state["diffusion_model.double_blocks.0.img_attn.qkv.lora_A.weight"]
    )
    a, b = modules["transformer_blocks.0.attn.to_v"]
    assert torch.allclose(qkv_delta[16:24], b @ a) and not qkv_delta[8:16].any()  # k was not trained: zero rows
    back = from_interchange(split_keys(state)[1], "flux2")
    for name, (a, b) in modules.items():
        assert torch.equal(back[name][0], a) and torch.equal(back[name][1], b)
    assert not back["transformer_blocks.0.attn.to_k"][1].any()  # the untrained part comes back as a zero LoRA


def test_foreign_fused_qkv_with_shared_a_splits_exactly():
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(4, 8, generator=g), torch.randn(24, 4, generator=g)  # one A for q, k and v, as other trainers
    state = {
        "diffusion_model.double_blocks.0.img_attn.qkv.lora_A.weight": a,
        "diffusion_model.double_blocks.0.img_attn.qkv.lora_B.weight": b,
        "diffusion_model.double_blocks.0.img_attn.qkv.alpha": torch.tensor(2.0),
    }
    back = from_interchange(split_keys(state)[1], "flux2")
    full = torch.cat(
        [
            back[f"transformer_blocks.0.attn.{n}"][1] @ back[f"transformer_blocks.0.attn.{n}"][0]
            for n in ("to_q", "to_k", "to_v")
        ]
    )
    assert torch.allclose(full, b @ a * 0.5)  # alpha / rank = 2 / 4 folded in


def test_unknown_modules_are_refused():
    g = torch.Generator().manual_seed(2)
    with pytest.raises(LoraFileError, match="norm_out.linear"):
        to_interchange({"norm_out.linear": _pair(2, 4, 4, g)}, "flux2")
    with pytest.raises(LoraFileError, match="not a flux2 module"):
        from_interchange({"double_blocks.0.img_attn.norm": dict(zip("AB", _pair(2, 4, 4, g)))}, "flux2")
    with pytest.raises(LoraFileError, match="no LoRA layout"):
        to_interchange({"blocks.0.attn.qkv": _pair(2, 4, 4, g)}, "mini")
