"""Family knowledge lives with the families: every family module offers the protocol's functions, the LoRA layout
rows are consistent data, the miniature's hooks answer for it, and the core never reaches past the protocol (no
import of dopsd.mini, no family-name comparison, no getattr/hasattr on adapters)."""

from __future__ import annotations

import ast
import importlib
import re
from pathlib import Path

import pytest
import torch

from dopsd.lora.layout import native_name, unexportable
from dopsd.mini import world
from dopsd.mini.adapter import tiny_random_adapter
from dopsd.models import registry
from dopsd.models.base import FamilyModule, LoraLayout

ROOT = Path(__file__).resolve().parents[1] / "dopsd"
# Outside the core: the families themselves, and the bench and UI, which are built on the miniature.
NOT_CORE = ("models", "mini", "bench", "ui")
# `dopsd demo` is the miniature's own command: its front end hands over to dopsd.mini.demo.
MINI_FRONT_ENDS = ("commands/demo.py",)


def test_every_family_module_offers_the_protocol_functions():
    wanted = [n for n in vars(FamilyModule) if not n.startswith("_")]
    assert {"load", "caption_problems", "lora_layout", "owns_network", "base_facts"} <= set(wanted)
    assert set(registry.PLAN_MODULES) == set(registry.FAMILIES)
    for family in registry.FAMILIES:
        module = registry.family_module(family)
        missing = [n for n in wanted if not callable(getattr(module, n, None))]
        assert not missing, (family, missing)
        assert callable(importlib.import_module(registry.PLAN_MODULES[family]).plan_spec), family
    assert registry.interchange_families() == ("zimage", "flux2")  # the miniature's LoRAs stay dopsd's own


def _render(template: str, layout: LoraLayout) -> str:
    """One concrete module name of a row (block 3, the first block list)."""
    values = {name: ("3" if name == "i" else pattern.split("|")[0]) for name, pattern in layout.placeholders}
    return template.format(**values)


@pytest.mark.parametrize("family", ["zimage", "flux2"])
def test_layout_rows_are_consistent_and_tell_their_family(family):
    layout = registry.lora_layout(family)
    diffusers = [_render(d, layout) for d, _, _ in layout.rows]
    native = [_render(n, layout) for _, n, _ in layout.rows]
    for module, expected, (_, _, slot) in zip(diffusers, native, layout.rows):
        assert native_name(family, module) == (expected, slot)
    fused = {}
    for name, (_, _, slot) in zip(native, layout.rows):
        if slot is not None:
            fused.setdefault(name, set()).add(slot)
    assert all(slots == {0, 1, 2} for slots in fused.values()), fused  # every fused q/k/v has its three parts
    assert unexportable(family, diffusers) == [] and unexportable(family, ["norm_out.linear"]) == ["norm_out.linear"]
    blocks = [m for m in diffusers + native if re.search(r"\.3\.", m)]
    assert registry.family_of_lora(blocks) == family
    others = [f for f in registry.interchange_families() if f != family]
    assert not any(re.search(registry.lora_layout(o).sign, m) for o in others for m in blocks)


def test_a_networks_family_and_base_facts_come_from_its_family():
    mini = tiny_random_adapter()
    assert registry.family_of_network(mini.network) == "mini"
    assert registry.family_of_network(torch.nn.Linear(2, 2)) is None
    facts = registry.base_facts("mini", mini.network)
    assert (facts.variant, facts.architecture) == ("dopsd miniature", "dopsd-miniature")
    assert registry.base_facts("zimage") is None and registry.base_facts("flux2", lora={}) is None


def test_the_miniatures_hooks():
    a = tiny_random_adapter()
    assert a.health_quality(["a red circle", "a blue square on a gray background"]) is not None
    assert a.health_quality(["a red circle", "a sks"]) is None  # no shape: no clean reference render
    assert a.probe_scorer().name == "mini-attributes"
    unseen = a.unseen_prompts("sks")
    trained = {
        f"a sks {world.SHAPES[s]} on a {b} background"
        for s in world.CONCEPT_TRAIN_SHAPES
        for b in world.CONCEPT_TRAIN_BACKGROUNDS
    }
    assert len(unseen) == 4 and not set(unseen) & trained
    assert all(world.caption_issue(p) is None for p in unseen)  # the miniature reads every one of them
    a.check_lora_targets(["anything"])  # its LoRA files are dopsd's own: nothing to refuse


def test_the_miniatures_cache_identity_is_its_weights():
    a, b = tiny_random_adapter(0), tiny_random_adapter(0)
    assert a.cache_fingerprint() == b.cache_fingerprint()
    with torch.no_grad():
        next(b.network.parameters()).add_(1e-3)
    assert a.cache_fingerprint() != b.cache_fingerprint()
    assert tiny_random_adapter(1).cache_fingerprint() != a.cache_fingerprint()


# --- the core reaches families only through the protocol and the registry -----------------------------------


def _core_files() -> list[Path]:
    files = []
    for path in sorted(ROOT.rglob("*.py")):
        rel = path.relative_to(ROOT)
        if rel.parts[0] in NOT_CORE or str(rel) in MINI_FRONT_ENDS:
            continue
        files.append(path)
    return files


def _strings(node: ast.AST) -> list[str]:
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return [node.value]
    if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
        return [s for e in node.elts for s in _strings(e)]
    return []


def _violations(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(), str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("dopsd.mini"):
            found.append(f"line {node.lineno}: imports {node.module}")
        elif isinstance(node, ast.ImportFrom) and node.module == "dopsd" and any(a.name == "mini" for a in node.names):
            found.append(f"line {node.lineno}: imports dopsd.mini")
        elif isinstance(node, ast.Import) and any(a.name.startswith("dopsd.mini") for a in node.names):
            found.append(f"line {node.lineno}: imports dopsd.mini")
        elif isinstance(node, ast.Compare):
            names = [s for part in [node.left, *node.comparators] for s in _strings(part) if s in registry.FAMILIES]
            if names:
                found.append(f"line {node.lineno}: compares with family name(s) {names}")
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Name)
            and node.func.id in ("getattr", "hasattr")
            and node.args
            and "adapter" in ast.unparse(node.args[0])
        ):
            found.append(f"line {node.lineno}: {node.func.id} on {ast.unparse(node.args[0])}")
    return found


def test_the_checks_see_what_they_look_for(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text(
        "from dopsd.mini import metrics\nimport dopsd.mini.world\n"
        "def f(adapter, cfg):\n    if cfg.family in ('zimage', 'flux2') or adapter.name == 'mini':\n"
        "        return getattr(adapter, 'kind', None)\n"
    )
    assert len(_violations(bad)) == 5


def test_the_core_reaches_families_only_through_the_protocol():
    found = {str(p.relative_to(ROOT)): v for p in _core_files() if (v := _violations(p))}
    assert not found, found
