"""The dashboards work live in JupyterLab and in the classic Notebook (7), in a real browser: notebook
03's router explorer, and notebook 08's trained-model explorer (its cells tagged "model-explorer",
served alone: the live training runs before them are left out).

Starts JupyterLab on 127.0.0.1 (random token, free port, nothing fetched from the network) serving
copies of the notebooks without their outputs, so autosave can never touch the committed files.
Headless Chromium (Debian's package at /usr/bin/chromium, driven by Playwright, which cannot download
its own browser here) opens a notebook, runs all cells from the Run menu, checks that the widgets
rendered, drags a slider with the mouse (top_k in 03, the token in 08's explorer) and checks that the
views changed. A screenshot goes to test-artifacts/. Every process started here is stopped at the
end, kernels included.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import nbformat
import pytest

pytestmark = pytest.mark.browser

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOK = ROOT / "notebooks" / "03_routing_explorer.ipynb"
TRAINING = ROOT / "notebooks" / "08_training.ipynb"
MODEL_TAG = "model-explorer"  # the tag of notebook 08's trained-model explorer cells
MODEL_NOTEBOOK = "08_model_explorer.ipynb"  # the name those cells are served under
ARTIFACTS = ROOT / "test-artifacts"
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
# The two front ends, as served by one Jupyter server: the notebook's address in each.
FRONT_ENDS = {"jupyterlab": "lab/tree/{name}", "notebook": "notebooks/{name}"}
# JupyterLab user settings (Notebook 7 reads the same): no autosave (a second guard for the committed notebook); every cell kept in
# the page (no windowing), so that widgets below the fold are in the DOM to check; the notebook's
# kernel started without asking.
LAB_SETTINGS = {
    "@jupyterlab/docmanager-extension/plugin.jupyterlab-settings": {"autosave": False},
    "@jupyterlab/notebook-extension/tracker.jupyterlab-settings": {"windowingMode": "none",
                                                                   "autoStartDefaultKernel": True},
    "@jupyterlab/apputils-extension/notification.jupyterlab-settings": {"fetchNews": "false",
                                                                       "checkForUpdates": False},
}
NO_NETWORK_FLAGS = ["--no-browser", "--LabApp.news_url=None", "--LabApp.extension_manager=readonly",
                    "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
                    "--ServerApp.terminals_enabled=False"]


@pytest.fixture(scope="module")
def chromium():
    if not CHROMIUM.exists():
        reason = f"{CHROMIUM} is missing: install Debian's chromium package (apt-get install chromium)"
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)
    return CHROMIUM


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def descendants(pid: int) -> list[int]:
    """Every process below `pid` (from /proc), children first: kernels run in sessions of their own,
    so they are not in the server's process group."""
    parents = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # the process ended while we looked
        parents.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        children = parents.get(todo.pop(), [])
        found += children
        todo += children
    return found


def stop(proc: subprocess.Popen) -> None:
    """SIGTERM the server's process group (the server shuts its kernels down), then SIGKILL whatever
    it started that is still alive."""
    started = descendants(proc.pid)
    signal_group(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        signal_group(proc.pid, signal.SIGKILL)
        proc.wait()
    for pid in started:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def signal_group(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):  # the group has already ended
        os.killpg(pgid, sig)


def served_notebooks() -> dict:
    """{name: notebook without stored outputs}: notebook 03, and notebook 08's cells tagged MODEL_TAG."""
    nb03, nb08 = (nbformat.read(path, as_version=4) for path in (NOTEBOOK, TRAINING))
    nb08.cells = [cell for cell in nb08.cells if MODEL_TAG in cell.metadata.get("tags", [])]
    assert nb08.cells, f"{TRAINING.name} has no cells tagged {MODEL_TAG!r}"
    for nb in (nb03, nb08):
        for cell in nb.cells:
            if cell.cell_type == "code":
                cell.outputs, cell.execution_count = [], None
        nb.metadata.pop("widgets", None)  # the stored widget state
    return {NOTEBOOK.name: nb03, MODEL_NOTEBOOK: nb08}


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    """A running JupyterLab serving the notebooks of `served_notebooks` (so that what the test sees was
    computed in the browser's kernel): yields (base url, token, {name: notebook})."""
    home = tmp_path_factory.mktemp("lab")
    served = home / "notebooks"
    served.mkdir()
    notebooks = served_notebooks()
    for name, nb in notebooks.items():
        nbformat.write(nb, served / name)
    for name, values in LAB_SETTINGS.items():
        path = home / "settings" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(values))
    token, port = secrets.token_hex(16), free_port()
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", JUPYTERLAB_SETTINGS_DIR=str(home / "settings"),
               JUPYTERLAB_WORKSPACES_DIR=str(home / "workspaces"), JUPYTER_RUNTIME_DIR=str(home / "runtime"),
               JUPYTER_CONFIG_DIR=str(home / "config"), JUPYTER_DATA_DIR=str(home / "data"),
               IPYTHONDIR=str(home / "ipython"))  # nothing written outside the temporary folder
    log = (home / "lab.log").open("w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "jupyter", "lab", f"--IdentityProvider.token={token}", "--ServerApp.ip=127.0.0.1",
         f"--ServerApp.port={port}", "--ServerApp.port_retries=0", f"--notebook-dir={served}",
         *NO_NETWORK_FLAGS, *(["--allow-root"] if os.geteuid() == 0 else [])],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                urllib.request.urlopen(f"{url}/api/status?token={token}", timeout=2)
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"JupyterLab did not start:\n{(home / 'lab.log').read_text()}") from None
                time.sleep(0.5)
        yield url, token, notebooks
    finally:
        stop(proc)
        log.close()


def run_all_cells(page, prompts) -> None:
    """Run All Cells from the Run menu, again until a cell starts: until the kernel is connected the
    command only moves the cursor, and no front end says "connected" the same way."""
    from playwright.sync_api import expect

    started = prompts.filter(has_text=re.compile(r"^\[(\*|\d+)\]:$"))
    deadline = time.monotonic() + 180
    while True:
        page.get_by_role("menuitem", name="Run", exact=True).click()
        page.get_by_role("menuitem", name="Run All Cells", exact=True).click()
        try:
            expect(started.first).to_be_visible(timeout=15_000)
            return
        except AssertionError:
            assert time.monotonic() < deadline, "Run All Cells started no cell in 180 s"


def wait_for_all_cells(prompts, errors, n_code: int, timeout_s: float) -> None:
    """Until every code cell shows an execution count ("[ ]:" before, "[*]:" while queued or running);
    fail at once with the traceback if a cell raised (Run All stops there)."""
    from playwright.sync_api import expect

    done = prompts.filter(has_text=re.compile(r"^\[\d+\]:$"))
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            expect(done).to_have_count(n_code, timeout=2_000)  # an expect also lets dialog handlers run
            return
        except AssertionError:
            assert errors.count() == 0, f"a cell failed:\n{errors.first.inner_text()}"
            assert time.monotonic() < deadline, f"Run All Cells ran {done.count()} of {n_code} cells in {timeout_s} s"


def drag_slider(page, slider, value: int) -> None:
    """Drag a noUiSlider's handle with the mouse to `value`, as a person would (arrow keys are taken by
    the notebook's own shortcuts in some front ends)."""
    handle, track = slider.locator(".noUi-handle"), slider.locator(".noUi-base")
    handle.scroll_into_view_if_needed()
    low, high = float(handle.get_attribute("aria-valuemin")), float(handle.get_attribute("aria-valuemax"))
    box, grip = track.bounding_box(), handle.bounding_box()
    page.mouse.move(grip["x"] + grip["width"] / 2, grip["y"] + grip["height"] / 2)
    page.mouse.down()
    page.mouse.move(box["x"] + box["width"] * (value - low) / (high - low), grip["y"] + grip["height"] / 2, steps=8)
    page.mouse.up()


@contextlib.contextmanager
def running_notebook(chromium, lab, tmp_path, front_end: str, name: str):
    """Open the served notebook `name` in `front_end`, run all its cells and wait for them: yields
    (page, notebook locator). A screenshot of the end state goes to test-artifacts/."""
    from playwright.sync_api import expect, sync_playwright

    url, token, notebooks = lab
    ARTIFACTS.mkdir(exist_ok=True)
    with sync_playwright() as p:
        context = p.chromium.launch_persistent_context(
            str(tmp_path / "chromium-profile"), executable_path=str(chromium), headless=True,
            args=CHROMIUM_ARGS, viewport={"width": 1400, "height": 1000})
        page = context.new_page()
        try:
            # On a slow machine a kernel may answer late and the front end then asks which kernel to
            # use: keep the notebook's own.
            kernel_dialog = page.locator(".jp-Dialog", has_text="Select Kernel")
            page.add_locator_handler(kernel_dialog,
                                     lambda: kernel_dialog.get_by_role("button", name="Select", exact=True).click())
            page.goto(f"{url}/{FRONT_ENDS[front_end].format(name=name)}?token={token}", timeout=120_000)
            notebook = page.locator(".jp-NotebookPanel:not(.lm-mod-hidden) .jp-Notebook")
            prompts = notebook.locator(".jp-CodeCell .jp-InputPrompt")
            n_code = sum(c.cell_type == "code" for c in notebooks[name].cells)
            expect(prompts).to_have_count(n_code, timeout=120_000)  # a loaded machine renders cells late
            run_all_cells(page, prompts)
            errors = notebook.locator(".jp-OutputArea-output[data-mime-type='application/vnd.jupyter.stderr']",
                                      has_text="Traceback")
            # A guard against a hang, not a speed limit: under heavy load (a second test run on the same
            # two cores) the model explorer's notebook took over 300 s.
            wait_for_all_cells(prompts, errors, n_code, timeout_s=900)
            yield page, notebook
        finally:
            page.screenshot(path=str(ARTIFACTS / f"browser_nb{name[:2]}_{front_end}.png"), full_page=False)
            context.close()


def rendered_dashboard(page, notebook, n_sliders: int):
    """The output area of the first widget dashboard, once rendered, with its `n_sliders` sliders."""
    from playwright.sync_api import expect

    dashboard = notebook.locator(".jp-OutputArea-output", has=page.locator(".widget-slider")).first
    expect(dashboard).to_be_visible(timeout=60_000)
    expect(page.get_by_text("Loading widget")).to_have_count(0, timeout=60_000)
    expect(dashboard.locator(".widget-slider")).to_have_count(n_sliders)
    return dashboard


@pytest.mark.parametrize("front_end", FRONT_ENDS)
def test_dashboard_renders_and_follows_a_slider(chromium, lab, tmp_path, front_end):
    from playwright.sync_api import expect

    committed = NOTEBOOK.read_bytes()
    with running_notebook(chromium, lab, tmp_path, front_end, NOTEBOOK.name) as (page, notebook):
        dashboard = rendered_dashboard(page, notebook, 5)  # seq_len, block_size, top_k, head, query
        sliders = dashboard.locator(".widget-slider")
        image, summary = dashboard.locator("img"), dashboard.locator(".widget-html", has_text="attends blocks")
        src_before, text_before = image.get_attribute("src"), summary.inner_text()
        assert src_before and "attends blocks" in text_before

        top_k = sliders.filter(has_text="top_k")
        drag_slider(page, top_k, 3)
        expect(top_k.locator(".widget-readout")).to_have_text("3", timeout=10_000)
        expect(summary).not_to_have_text(text_before, timeout=30_000)
        expect(image).not_to_have_attribute("src", src_before, timeout=30_000)
        assert "attends blocks [7, 1, " in summary.inner_text()  # top_k 3: own block, needle, one more
    assert NOTEBOOK.read_bytes() == committed


@pytest.mark.parametrize("front_end", FRONT_ENDS)
def test_model_explorer_follows_its_token_slider(chromium, lab, tmp_path, front_end):
    """Notebook 08's trained-model explorer: dragging the token slider moves the token and redraws the
    text of the blocks it attends."""
    from playwright.sync_api import expect

    committed = TRAINING.read_bytes()
    with running_notebook(chromium, lab, tmp_path, front_end, MODEL_NOTEBOOK) as (page, notebook):
        dashboard = rendered_dashboard(page, notebook, 3)  # layer, head, token
        summary = dashboard.locator(".widget-html", has_text="attends blocks")
        own = dashboard.locator("[data-state='own block']")
        expect(own).to_have_count(1)
        token = dashboard.locator(".widget-slider").filter(has_text="token t")
        readout, image = token.locator(".widget-readout"), dashboard.locator("img")
        before, own_before, src_before = readout.inner_text(), own.inner_text(), image.get_attribute("src")
        assert f"token t={before} " in summary.inner_text()

        drag_slider(page, token, 40)  # the notebook opens it near the end of the text
        expect(readout).not_to_have_text(before, timeout=10_000)
        after = readout.inner_text()
        expect(summary).to_contain_text(f"token t={after} ", timeout=30_000)
        expect(own).not_to_have_text(own_before, timeout=30_000)  # another own block, or the token moved in it
        expect(image).not_to_have_attribute("src", src_before, timeout=30_000)
        block = int(own.get_attribute("data-block"))
        assert block == int(after) // int(re.search(r"block_size=(\d+)", summary.inner_text())[1])
    assert TRAINING.read_bytes() == committed
