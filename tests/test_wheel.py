"""The package as a user installs it: `python -m build` makes an sdist and a wheel (built from the sdist) that
carry the miniature's weights, the presets and the web app; the wheel installed into a fresh virtual environment
runs `dopsd demo` from there, away from this checkout."""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
import tarfile
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CARRIED = (  # package data the installed dopsd reads at run time
    "dopsd/mini/weights/turbo.safetensors",
    "dopsd/mini/weights/base.safetensors",
    "dopsd/mini/weights/manifest.json",
    "dopsd/configs/mini.yaml",
    "dopsd/configs/zimage-turbo.yaml",
    "dopsd/configs/flux2-klein-4b.yaml",
    "dopsd/models/fullsize/zimage-turbo.json",
    "dopsd/ui/static/index.html",
    "dopsd/ui/static/app.css",
    "dopsd/ui/static/js/app.js",
)


def _run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    done = subprocess.run(cmd, capture_output=True, text=True, **kw)
    assert done.returncode == 0, f"{cmd[:4]} exited {done.returncode}:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done


@pytest.mark.slow
def test_wheel_and_sdist_carry_the_data_and_the_installed_wheel_runs_the_demo(tmp_path):
    if not (ROOT / "pyproject.toml").is_file():
        pytest.skip("not a source checkout")
    dist = tmp_path / "dist"
    # No build isolation: the build backend (setuptools) of this environment, nothing downloaded
    _run([sys.executable, "-m", "build", "--no-isolation", "--outdir", str(dist), str(ROOT)])
    wheel, sdist = next(dist.glob("dopsd-*.whl")), next(dist.glob("dopsd-*.tar.gz"))
    in_wheel = set(zipfile.ZipFile(wheel).namelist())
    with tarfile.open(sdist) as tar:
        in_sdist = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
    for name in CARRIED:
        assert name in in_wheel, f"the wheel lacks {name}"
        assert name in in_sdist, f"the sdist lacks {name}"
    assert not any(n.startswith("tests/") for n in in_wheel)

    # A fresh environment whose only view of the installed dependencies is this one's site-packages (a .pth line,
    # not processed for .pth files of its own, so this checkout's editable dopsd stays invisible): the wheel's
    # requirements must be met without an index (--no-index), and dopsd is imported from the wheel.
    env_dir = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(env_dir)])
    python = env_dir / "bin" / "python"
    site = Path(_run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).stdout.strip())
    (site / "dev_env.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    _run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-index", "--quiet", str(wheel)])
    where = _run([str(python), "-c", "import dopsd; print(dopsd.__file__)"], cwd=tmp_path).stdout.strip()
    assert Path(where).is_relative_to(site), where
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = _run(
        [str(env_dir / "bin" / "dopsd"), "demo", "--steps", "5", "--samples", "4", "--out", str(tmp_path / "demo")],
        cwd=tmp_path,
        env=env,
        timeout=600,
    )
    assert (tmp_path / "demo" / "summary.json").is_file() and (tmp_path / "demo" / "demo.png").is_file(), done.stdout
