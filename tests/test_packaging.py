"""The install files agree: every dependency of pyproject.toml (every extra included) is pinned in
constraints.txt, environment.yml pins the same versions, and both it and `make setup` install every
extra; `import moba_edu` stays light."""

import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

tomllib = pytest.importorskip("tomllib")  # Python >= 3.11

ROOT = Path(__file__).resolve().parent.parent


def normalise(name):
    return re.sub(r"[-_.]+", "-", name).lower()


def requirement_name(req):
    return normalise(re.split(r"[\s<>=!~;\[]", req, maxsplit=1)[0])


def pyproject_dependencies():
    """Every dependency and every extra's, less the project itself (an extra may name another: moba-edu[hf])."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = project["dependencies"] + [r for extra in project["optional-dependencies"].values() for r in extra]
    return {requirement_name(r) for r in reqs} - {normalise(project["name"])}


def pins(lines):
    found = {}
    for line in lines:
        m = re.match(r"^\s*([A-Za-z0-9_.\-]+)==([^\s;#]+)", line)
        if m:
            found[normalise(m.group(1))] = m.group(2)
    return found


def test_constraints_pin_every_dependency():
    constraints = pins((ROOT / "constraints.txt").read_text().splitlines())
    missing = pyproject_dependencies() - constraints.keys()
    assert not missing, f"constraints.txt lacks pins for {sorted(missing)}"


def test_environment_yml_matches_constraints():
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    pip_section = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    env_pins = pins(pip_section)
    constraints = pins((ROOT / "constraints.txt").read_text().splitlines())
    assert pyproject_dependencies() <= env_pins.keys(), \
        f"environment.yml lacks {sorted(pyproject_dependencies() - env_pins.keys())}"
    for name, version in env_pins.items():
        assert constraints.get(name) == version, f"{name}: environment.yml {version}, constraints {constraints.get(name)}"
    extras = ",".join(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"])
    assert f"-e .[{extras}]" in pip_section, f"environment.yml must install the package itself with [{extras}]"


def test_make_setup_installs_every_extra():
    extras = ",".join(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"])
    assert f'-e ".[{extras}]"' in (ROOT / "Makefile").read_text(), f"make setup must install .[{extras}]"


def test_import_is_light():
    code = "import sys, moba_edu; print(sorted(m for m in ('matplotlib', 'ipywidgets', 'triton') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]", f"import moba_edu pulled in {out.strip()}"
