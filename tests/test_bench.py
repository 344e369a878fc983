"""The benchmark harness (moba_edu.bench) and the cost model (moba_edu.cost), on a CPU.

The GPU suites cannot run here: their point lists, the committed H200 JSON and re-plotting from it
are checked instead. One tiny CPU point is measured for real, through the command line, into a
temporary folder. No test asserts a time: only that times were taken and written.
"""

import ast
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given

import moba_edu as me
from moba_edu import cost
from moba_edu.bench import floors, harness, suites
from reference import reference_routing_mask
from strategies import cases

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "figures" / "bench"
PACKAGE = ROOT / "moba_edu" / "bench"
# One naming scheme: an optional leading word, then tagged parameters, joined by "-" (no "_" separators).
TAG = r"(?:S\d+|bs\d+|k\d+|h\d+x\d+|d\d+|B\d+|m\d+n\d+w\d+s\d+)"
POINT = re.compile(rf"(?:[a-z][a-z0-9_]*|{TAG})(?:-{TAG})*")
EXPECTED = {"cpu": ["torch_vs_naive", "explorer"],
            "gpu": ["ceilings", "dense_sdpa", "moba_fwd", "moba_fwd_tiles", "moba_fwd_hdim", "moba_fwd_bwd",
                    "moba_bwd_hdim", "bwd_tiles", "bwd_dq", "kernel_split", "decode"]}
# Registered suites whose GPU run is not committed yet (remove a name once its JSON is).
NOT_MEASURED_YET = set()


def test_registry_holds_every_suite_in_run_order():
    for device, names in EXPECTED.items():
        assert [suite.name for suite in harness.suites(device)] == names
    for suite in harness.SUITES.values():
        names = [name for name, _ in suite.points()]
        assert names and len(set(names)) == len(names), suite.name
        assert all(POINT.fullmatch(name) for name in names), (suite.name, names)


def test_register_rejects_a_taken_name_a_dash_and_an_unknown_device():
    points = lambda: []  # noqa: E731
    with pytest.raises(ValueError, match="taken"):
        harness.register(harness.Suite("moba_fwd", "gpu", points, None))
    with pytest.raises(ValueError, match="'-'"):
        harness.register(harness.Suite("a-b", "cpu", points, None))
    with pytest.raises(ValueError, match="device"):
        harness.register(harness.Suite("tpu_suite", "tpu", points, None))


def test_point_names_follow_one_order_whatever_the_argument_order():
    assert harness.point_name(heads=(16, 16), top_k=3, S=8192, block_size=512) == "S8192-bs512-k3-h16x16"
    assert harness.point_name("torch", S=1024) == "torch-S1024"
    assert harness.point_name(B=8, heads=(32, 8), S=32768) == "S32768-h32x8-B8"
    assert harness.point_name(S=131072, block_size=512, top_k=3, tile=(128, 64, 8, 3)) == "S131072-bs512-k3-m128n64w8s3"
    assert harness.point_name(head_dim=256, heads=(16, 16), S=32768) == "S32768-h16x16-d256"
    assert harness.moba_point(32768, 32, 8, 512, 3) == (
        "S32768-bs512-k3-h32x8", dict(S=32768, Hq=32, Hkv=8, block_size=512, top_k=3))
    with pytest.raises(ValueError, match="unknown parameters.*seq_len"):
        harness.point_name(seq_len=8)
    with pytest.raises(ValueError, match="what"):
        harness.point_name("a-b", S=8)


def test_committed_json_is_named_by_the_scheme_and_covers_each_suite():
    seen = {}
    for path in sorted(BENCH.glob("*/*.json")):
        record = json.loads(path.read_text())
        suite = harness.SUITES[record["suite"]]
        assert path.parent.name == harness.DEVICE_DIRS[suite.device] == harness.DEVICE_DIRS[record["device"]]
        assert path.name == f"{suite.name}-{record['point']}.json" and POINT.fullmatch(record["point"]), path
        assert path.read_text() == json.dumps(record, indent=1, sort_keys=True) + "\n", f"{path}: not written by write_json"
        seen.setdefault(suite.name, set()).add(record["point"])
    for name, points in seen.items():
        assert points == {point for point, _ in harness.SUITES[name].points()}, name
    assert set(seen) == {name for names in EXPECTED.values() for name in names} - NOT_MEASURED_YET


def test_committed_counts_agree_with_the_cost_model():
    """Every MoBA point's pair counts, as the router chose them on the GPU, against the formulas."""
    for path in sorted(BENCH.glob("h200/moba_fwd*-S*-h*.json")):
        if "_hdim-" in path.name:   # the head-dim suites keep only the density
            continue
        r = json.loads(path.read_text())
        S, bs, k, H = r["shape"]["S"], r["block_size"], r["top_k"], r["shape"]["Hq"]
        assert r["attended_pairs"] == r["own_pairs"] + r["routed_pairs"] == H * cost.attended_pairs(S, bs, k), path
        assert r["routed_pairs"] == bs * r["routed_blocks"] and r["eligible_blocks"] == H * cost.eligible_blocks(S, bs)
        assert r["density"] == pytest.approx(cost.density(S, bs, k), rel=1e-12)
        assert {"copy_bytes_per_s", "bf16_flops_per_s"} <= set(r["ceilings"]), path


def test_replotting_from_the_committed_json_draws_every_committed_figure(tmp_path):
    pytest.importorskip("matplotlib")
    from PIL import Image

    shutil.copytree(BENCH, tmp_path / "bench")
    written = suites.plot_all(tmp_path / "bench")
    assert sorted(p.name for p in written) == sorted(p.name for p in BENCH.glob("*.png"))
    for path in written:
        assert Image.open(path).size == Image.open(BENCH / path.name).size, path.name


def test_a_tiny_cpu_point_measured_through_the_command_line(tmp_path):
    """One real point (the torch rung at S = 1024, in its own process), written and plotted in tmp_path."""
    pytest.importorskip("matplotlib")
    done = subprocess.run([sys.executable, "-m", "moba_edu.bench", "--cpu", "--only", "torch_vs_naive/torch-S1024",
                           "--out", str(tmp_path)], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    files = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*.*"))
    assert files == ["cpu/torch_vs_naive-torch-S1024.json", "cpu_torch_vs_naive.png"]
    r = json.loads((tmp_path / files[0]).read_text())
    assert (r["suite"], r["point"], r["device"], r["impl"]) == ("torch_vs_naive", "torch-S1024", "cpu", "torch")
    assert len(r["times_s"]) >= 3 and all(t > 0 for t in r["times_s"]) and min(r["times_s"]) <= r["median_s"]
    assert r["predicted_extra_bytes"] == cost.torch_bytes(1, 4, 4, 1024, 64, 256, 3)
    assert r["extra_bytes"] == r["peak_rss_bytes"] - r["base_rss_bytes"] and r["peak_rss_bytes"] >= r["base_rss_bytes"]
    assert "speedup_vs_naive" not in r  # no naive point in tmp_path to compare with


def test_run_measures_only_the_selected_points(tmp_path, monkeypatch):
    calls = []
    suite = harness.Suite("toy", "cpu", lambda: [(harness.point_name("a", S=n), {"n": n}) for n in (1, 2, 3)],
                          lambda params, out: calls.append(params["n"]) or {"n": params["n"]})
    monkeypatch.setattr(harness, "SUITES", {"toy": suite})
    written = harness.run("cpu", ["toy/a-S2", "toy/*-S3"], tmp_path)
    assert calls == [2, 3] and [p.name for p in written] == ["toy-a-S2.json", "toy-a-S3.json"]
    assert [r["n"] for r in harness.read_points(tmp_path, suite)] == [2, 3]
    assert harness.run("gpu", None, tmp_path) == []


def test_list_prints_the_selected_points_and_measures_nothing(tmp_path):
    done = subprocess.run([sys.executable, "-m", "moba_edu.bench", "--gpu", "--list", "--only", "*_hdim",
                           "--out", str(tmp_path)], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.split()
    assert len(lines) == 8 and "moba_fwd_hdim/S131072-bs512-k3-h16x16-d256" in lines
    assert {line.split("/")[0] for line in lines} == {"moba_fwd_hdim", "moba_bwd_hdim"}
    assert sorted({line.rsplit("-", 1)[1] for line in lines}) == ["d192", "d256"]
    assert not any(tmp_path.iterdir())


def test_wall_times_warm_up_then_repeat():
    calls = []
    times = harness.wall_times(lambda: calls.append(1), min_repeats=4, min_seconds=0.0)
    assert len(times) == 4 and len(calls) == 5 and all(t >= 0 for t in times)


def test_floor_is_the_larger_of_the_byte_and_flop_times():
    ceil = {"copy_bytes_per_s": 1e12, "bf16_flops_per_s": 1e15, "fp32_flops_per_s": 1e14}
    assert floors.floor_ms(ceil, nbytes=2e9, flops=1e12, rate="bf16") == pytest.approx(2.0)   # bytes bound
    assert floors.floor_ms(ceil, nbytes=2e9, flops=1e12, rate="fp32") == pytest.approx(10.0)  # FLOPs bound


@given(case=cases(max_s=40))
def test_routed_pair_counts_match_the_reference_mask(case):
    q, k, _ = case.tensors(torch.float32)
    routing = me.route(q, k, block_size=case.block_size, top_k=case.top_k)
    counts = cost.routed_pair_counts(routing.indices[0, :, :, 1:], case.S, case.block_size)
    g = case.Hq // case.Hkv
    tokens = [reference_routing_mask(q[0, h], k[0, h // g], case.block_size, case.top_k)
              .repeat_interleave(case.block_size, dim=1)[:, :case.S].tril() for h in range(case.Hq)]
    assert counts["attended_pairs"] == sum(int(t.sum()) for t in tokens)
    assert counts["attended_pairs"] == case.Hq * cost.attended_pairs(case.S, case.block_size, case.top_k)
    assert counts["density"] == pytest.approx(cost.density(case.S, case.block_size, case.top_k))


def test_bench_imports_form_no_cycle_and_nothing_imports_the_runner():
    graph = {}
    for path in PACKAGE.glob("*.py"):
        tree = ast.parse(path.read_text())
        graph[path.stem] = {alias.name if node.module is None else node.module
                            for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.level == 1
                            for alias in node.names}
    graph = {name: {dep.split(".")[0] for dep in deps} & set(graph) for name, deps in graph.items()}
    assert not any("__main__" in deps for deps in graph.values())
    assert graph["harness"] == set() and graph["__init__"] == set()
    done = set()
    while len(done) < len(graph):   # topological order exists iff there is no cycle
        ready = [name for name in graph if name not in done and graph[name] <= done]
        assert ready, f"import cycle among {sorted(set(graph) - done)}"
        done.update(ready)


def test_measuring_needs_no_matplotlib():
    code = "import sys, moba_edu.bench.suites; assert 'matplotlib' not in sys.modules, 'matplotlib imported'"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stderr


@pytest.mark.gpu
def test_gpu_suites_measure_their_smallest_points(tmp_path):
    """The GPU suites end to end at 8K: ceilings, dense baseline, forward and forward + backward."""
    only = ["dense_sdpa/S8192-h16x16", "moba_fwd/S8192-bs512-k3-h16x16", "moba_fwd_bwd/S8192-bs512-k3-h16x16"]
    written = harness.run("gpu", only, tmp_path)
    assert [p.name for p in written] == [f"{pattern.replace('/', '-')}.json" for pattern in only]
    assert (tmp_path / "h200" / "ceilings-h200.json").exists()   # measured by the first suite that needs it
    fwd, fwd_bwd = (json.loads(p.read_text()) for p in written[1:])
    for r in (fwd, fwd_bwd):
        assert r["attended_pairs"] == 16 * cost.attended_pairs(8192, 512, 3)
        assert r["density"] == pytest.approx(cost.density(8192, 512, 3))
    assert fwd["moba_ms"] > 0 and fwd["router_over_floor"] > 0 and fwd["cudnn_ms"] > 0
    assert fwd_bwd["moba_bwd_ms"] > 0 and fwd_bwd["bwd_over_floor"] > 0 and fwd_bwd["cudnn_fwd_bwd_ms"] > 0
