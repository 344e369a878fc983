"""The install files agree: every dependency of pyproject.toml (every extra included) is pinned in
constraints.txt (in pip freeze's order), environment.yml pins the same versions, and both it and
`make setup` install the package with every extra named, `.[dev,hf,nbgrader]` (an extra may also pull
in another, as dev does hf: naming each keeps the rule one line); `import moba_edu` stays light."""

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


def every_extra() -> str:
    """The extras part of the install spec: every extra of pyproject.toml, sorted, e.g. "dev,hf,nbgrader"."""
    return ",".join(sorted(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]))


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


def test_constraints_are_in_pip_freeze_order():
    lines = [line for line in (ROOT / "constraints.txt").read_text().splitlines() if line and not line.startswith("#")]
    assert lines == sorted(lines, key=str.lower), "constraints.txt: keep pip freeze's order (lines sorted, ignoring case)"
    assert f"-e '.[{every_extra()}]'" in (ROOT / "constraints.txt").read_text(), \
        f"constraints.txt's header should say it was frozen from .[{every_extra()}]"


def test_environment_yml_matches_constraints():
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    pip_section = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    env_pins = pins(pip_section)
    constraints = pins((ROOT / "constraints.txt").read_text().splitlines())
    assert pyproject_dependencies() <= env_pins.keys(), \
        f"environment.yml lacks {sorted(pyproject_dependencies() - env_pins.keys())}"
    for name, version in env_pins.items():
        assert constraints.get(name) == version, f"{name}: environment.yml {version}, constraints {constraints.get(name)}"
    assert f"-e .[{every_extra()}]" in pip_section, f"environment.yml must install the package with .[{every_extra()}]"


def test_make_setup_installs_every_extra():
    assert f'-e ".[{every_extra()}]"' in (ROOT / "Makefile").read_text(), f"make setup must install .[{every_extra()}]"


def test_import_is_light():
    code = "import sys, moba_edu; print(sorted(m for m in ('matplotlib', 'ipywidgets', 'triton') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]", f"import moba_edu pulled in {out.strip()}"
