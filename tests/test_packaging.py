"""freeze-agent as a user installs it: an sdist and a wheel built from it (what ``python -m build``
makes), the wheel installed into a fresh virtualenv, used from outside the checkout. It must ship
``envs/`` and ``policies/`` (``freeze_agent.core.resources``) and find them there.

Nothing is downloaded: the build uses this virtualenv's setuptools (``--no-build-isolation``),
and the fresh virtualenv sees this one's dependencies through a ``.pth`` file that lists its
site-packages. A path line in a ``.pth`` adds the folder to ``sys.path`` but does not run the
``.pth`` files inside it, so the checkout's editable install stays inactive there: the tests
check that ``freeze_agent`` is imported from the fresh virtualenv.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import zipfile
from pathlib import Path

import pytest

from freeze_agent.core.resources import ENVS_DIR, POLICIES_DIR

ROOT = Path(__file__).resolve().parents[1]
# repo-root folder -> where the wheel holds it (pyproject.toml's [tool.setuptools.package-dir])
SHIPPED = {"envs": "freeze_agent/_shipped_envs", "policies": "freeze_agent/_shipped_policies"}
# what a copy of the checkout leaves out, and what a build may not package
NOT_SOURCES = (".git", ".venv", "build", "dist", "runs", "wandb", "checkpoints", "__pycache__")
NOT_SOURCES_GLOBS = ("*.egg-info", "*.pyc", ".*_cache")
OFFLINE = ("--no-deps", "--no-index", "--no-cache-dir")  # pip: nothing fetched, nothing kept


def _source_files(folder: str) -> list[str]:
    """The files under ``folder`` of the checkout that a build may package, relative to it."""
    return sorted(
        path.relative_to(ROOT).as_posix()
        for path in (ROOT / folder).rglob("*")
        if path.is_file()
        and not set(path.relative_to(ROOT).parts) & set(NOT_SOURCES)
        and not any(path.match(glob) for glob in NOT_SOURCES_GLOBS)
    )


def _expected_in_wheel() -> dict[str, str]:
    """Path in the wheel -> path in the checkout, for every file the wheel must hold."""
    expected = {name: name for name in _source_files("freeze_agent") if name.endswith(".py")}
    for folder, target in SHIPPED.items():
        for name in _source_files(folder):
            expected[target + name[len(folder) :]] = name
    return expected


def _run(command: list[str | Path], **kwargs) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        [str(c) for c in command], capture_output=True, text=True, timeout=300, **kwargs
    )
    assert result.returncode == 0, (
        f"{' '.join(map(str, command))} failed ({result.returncode}):\n"
        f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    )
    return result


# ---------------------------------------------------------------------- fast checks


def test_every_code_package_is_listed_in_pyproject():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    on_disk = {
        ".".join(Path(name).parent.parts)
        for name in _source_files("freeze_agent")
        if name.endswith("/__init__.py")
    }
    missing = sorted(on_disk - set(setuptools["packages"]))
    assert not missing, (
        f"add {', '.join(missing)} to [tool.setuptools] packages in pyproject.toml: the wheel "
        "holds only the packages listed there"
    )
    package_dir = {package: ROOT / folder for package, folder in setuptools["package-dir"].items()}
    assert package_dir == {f"freeze_agent.{Path(t).name}": ROOT / f for f, t in SHIPPED.items()}


def test_the_editable_install_maps_the_shipped_folders_onto_the_checkout():
    assert ENVS_DIR.samefile(ROOT / "envs") and POLICIES_DIR.samefile(ROOT / "policies")


# ---------------------------------------------------------------------- built and installed


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> dict[str, Path]:
    """An sdist of a copy of the checkout, and a wheel built from that sdist."""
    work = tmp_path_factory.mktemp("packaging")
    source, dist = work / "source", work / "dist"
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(*NOT_SOURCES, *NOT_SOURCES_GLOBS))
    # the PEP 517 hook that `python -m build --sdist --no-isolation` calls
    build_sdist = "import sys, setuptools.build_meta as b; b.build_sdist(sys.argv[1])"
    _run([sys.executable, "-c", build_sdist, dist], cwd=source)
    (sdist,) = dist.glob("freeze_agent-*.tar.gz")
    pip_wheel = ["-m", "pip", "wheel", *OFFLINE, "--no-build-isolation", "--wheel-dir", dist]
    _run([sys.executable, *pip_wheel, sdist], cwd=work)
    (wheel,) = dist.glob("freeze_agent-*.whl")
    return {"work": work, "sdist": sdist, "wheel": wheel}


@pytest.fixture(scope="module")
def installed(built) -> dict[str, Path]:
    """A fresh virtualenv with the wheel installed, seeing this virtualenv's dependencies."""
    venv = built["work"] / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", venv])
    python = venv / "bin" / "python"
    # installed before the .pth exists, by this pip on the fresh interpreter's behalf, so that
    # pip never sees the checkout's editable freeze-agent
    _run([sys.executable, "-m", "pip", "--python", python, "install", *OFFLINE, built["wheel"]])
    purelib = "import sysconfig; print(sysconfig.get_path('purelib'))"
    site = Path(_run([python, "-c", purelib]).stdout.strip())
    dependencies = sorted({sysconfig.get_path("purelib"), sysconfig.get_path("platlib")})
    (site / "freeze_agent_test_dependencies.pth").write_text("\n".join(dependencies) + "\n")
    elsewhere = built["work"] / "elsewhere"  # the cwd: not the checkout, nothing importable
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "FREEZE_AGENT_ENVS")}
    return {"venv": venv, "python": python, "site": site, "cwd": elsewhere, "env": env}


@pytest.mark.slow
def test_the_sdist_and_the_wheel_hold_every_shipped_file(built):
    expected = _expected_in_wheel()
    with zipfile.ZipFile(built["wheel"]) as wheel:
        in_wheel = set(wheel.namelist())
    assert not sorted(set(expected) - in_wheel), "missing from the wheel"
    tops = {name.split("/")[0] for name in in_wheel}
    assert all(top == "freeze_agent" or top.endswith(".dist-info") for top in tops), tops
    with tarfile.open(built["sdist"]) as sdist:
        top = built["sdist"].name.removesuffix(".tar.gz")
        in_sdist = {name.removeprefix(top + "/") for name in sdist.getnames()}
    assert not sorted(set(expected.values()) - in_sdist), "missing from the sdist"


INSTALLED_CHECK = '''
import json, sys

import torch

import freeze_agent
from freeze_agent import FreezeController, make_policy
from freeze_agent.core.resources import ENVS_DIR, POLICIES_DIR
from freeze_agent.signals.predictor import load_predictor
from freeze_agent.tasks.spec import resolve_tasks


def from_pretrained():
    """FreezeController.from_pretrained on a tiny model, once it exists (None until then)."""
    if not hasattr(FreezeController, "from_pretrained"):
        return None
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 16), torch.nn.ReLU(),
        torch.nn.Linear(16, 4),
    )
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    example_input = torch.randn(16, 8)
    controller = FreezeController.from_pretrained(
        "default", model, optimizer, example_input, total_steps=60
    )
    try:
        assert isinstance(controller, FreezeController), type(controller)
        targets = torch.randint(4, (16,))
        for _ in range(3):
            optimizer.zero_grad()
            loss = torch.nn.functional.cross_entropy(model(example_input), targets)
            loss.backward()
            optimizer.step()
            controller.step(loss)
        return {"type": type(controller).__name__, "units": len(controller.units)}
    finally:
        controller.close()


policy = make_policy("default")
(task,) = resolve_tasks("mnist1d-cnn")
print(json.dumps({
    "freeze_agent": freeze_agent.__file__,
    "editable_finder": sorted(name for name in sys.modules if "__editable__" in name),
    "envs_dir": str(ENVS_DIR),
    "policies_dir": str(POLICIES_DIR),
    "policy": [type(policy).__name__, str(policy.directory)],
    "policy_parameters": sum(p.numel() for p in policy.network.parameters()),
    "task": [task.name, task.split, str(task.path)],
    "train_tasks": sorted(t.name for t in resolve_tasks("train")),
    "predictor_size": load_predictor().size,
    "from_pretrained": from_pretrained(),
}))
'''


@pytest.fixture(scope="module")
def report(installed) -> dict:
    """What the installed package says about itself (``INSTALLED_CHECK``, run there)."""
    script = installed["cwd"].parent / "installed_check.py"
    script.write_text(INSTALLED_CHECK)
    result = _run([installed["python"], script], cwd=installed["cwd"], env=installed["env"])
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_the_installed_wheel_is_what_runs_not_the_checkout(installed, report):
    module = Path(report["freeze_agent"])
    assert module.is_relative_to(installed["site"]) and not module.is_relative_to(ROOT)
    assert report["editable_finder"] == []
    assert Path(report["envs_dir"]) == installed["site"] / SHIPPED["envs"]
    assert Path(report["policies_dir"]) == installed["site"] / SHIPPED["policies"]


@pytest.mark.slow
def test_the_installed_wheel_loads_the_default_policy_and_the_shipped_tasks(report):
    policies = Path(report["policies_dir"])
    assert report["policy"] == ["LearnedPolicy", str(policies / "default")]
    assert report["policy_parameters"] > 0 and report["predictor_size"] > 0
    envs = Path(report["envs_dir"])
    assert report["task"] == ["mnist1d-cnn", "train", str(envs / "train" / "mnist1d-cnn.yaml")]
    assert report["train_tasks"] == sorted(p.stem for p in (ROOT / "envs" / "train").glob("*.yaml"))


@pytest.mark.slow
def test_the_installed_wheel_builds_a_controller_from_pretrained(report):
    if report["from_pretrained"] is None:
        pytest.skip("FreezeController.from_pretrained does not exist yet")
    assert report["from_pretrained"]["type"] == "FreezeController"
    assert report["from_pretrained"]["units"] > 1


@pytest.mark.slow
def test_the_installed_console_script_lists_the_shipped_tasks(installed):
    script = installed["venv"] / "bin" / "freeze-agent"
    assert script.read_text().splitlines()[0] == f"#!{installed['python']}"
    result = _run([script, "envs"], cwd=installed["cwd"], env=installed["env"])
    names = sorted(p.stem for p in (ROOT / "envs").glob("*/*.yaml"))
    assert len(names) >= 10 and all(name in result.stdout for name in names), result.stdout
