"""The docs site (mkdocs.yml, docs/) builds strictly: a link to a missing page, file or anchor, or a nav entry for a
missing page, fails the build, so no link and no generated table rots unseen. The README's own links are checked
here too, since the site does not build the README."""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]


def test_the_docs_site_builds_strictly(tmp_path):
    # material prints a banner about MkDocs 2.0 on every build; it says nothing about this site
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    build = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=REPO,
        capture_output=True,
        text=True,
        env=env,
    )
    assert "No module named mkdocs" not in build.stderr, "mkdocs is missing: pip install -e '.[dev]'"
    assert build.returncode == 0, build.stdout[-3000:] + build.stderr[-3000:]
    for page in ("index.html", "training/index.html", "configuration/index.html", "bad-inputs/index.html"):
        assert (tmp_path / "site" / page).is_file(), page
    # the generated table of options reached the site as a table, not as text
    assert "<table>" in (tmp_path / "site" / "configuration" / "index.html").read_text()


def test_the_strict_build_fails_on_a_broken_link(tmp_path):
    """The check above can fail: the same configuration on a copy of docs/ with one link to a missing anchor."""
    docs = tmp_path / "docs"
    shutil.copytree(REPO / "docs", docs)
    (docs / "health.md").write_text((docs / "health.md").read_text() + "\n[gone](benchmark.md#no-such-section)\n")
    config = yaml.safe_load((REPO / "mkdocs.yml").read_text())
    config["docs_dir"] = str(docs)
    (tmp_path / "mkdocs.yml").write_text(yaml.safe_dump(config))
    build = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
    )
    assert build.returncode != 0
    warnings = [line for line in (build.stdout + build.stderr).splitlines() if line.startswith("WARNING")]
    assert len(warnings) == 1 and "no-such-section" in warnings[0], warnings


def test_every_nav_entry_exists_and_every_readme_link_resolves():
    config = yaml.safe_load((REPO / "mkdocs.yml").read_text())

    def pages(nav):
        for item in nav:
            for value in item.values() if isinstance(item, dict) else [item]:
                yield from pages(value) if isinstance(value, list) else [value]

    missing = [p for p in pages(config["nav"]) if not (REPO / "docs" / p).is_file()]
    assert not missing, f"mkdocs.yml's nav names pages that do not exist: {missing}"
    readme = (REPO / "README.md").read_text()
    targets = re.findall(r"\]\(([^)\s]+)\)", readme)
    assert any(t.startswith("docs/") for t in targets)
    broken = [t for t in targets if "://" not in t and not (REPO / t.split("#")[0]).exists()]
    assert not broken, f"README.md links to files that do not exist: {broken}"
