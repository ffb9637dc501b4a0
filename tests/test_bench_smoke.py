"""Benchmarks cannot rot: every benchmark (a bench/ module with a ``__main__``) has a ``--smoke`` mode (the tiny
synthetic model, 1-2 steps, the real code path) and a ``SMOKE`` table {extra arguments: the RESULT names it must
print}; each case runs as ``python -m bench.<name> --smoke <extra>`` in a subprocess and must print every promised
``RESULT name=value`` with a finite number. bench/gpu.sh is valid bash and names only benchmarks and tests that exist.

The subprocesses run two at a time (imports dominate): about a minute and a half in all on two CPU cores."""
from __future__ import annotations

import importlib
import importlib.util
import math
import os
import re
import shlex
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench"
# a benchmark: a bench/ module one runs (python -m bench.<name>); helpers (_common, a demo project) have no __main__
MODULES = sorted(p.stem for p in BENCH.glob("*.py")
                 if not p.stem.startswith("_") and "__name__ == \"__main__\"" in p.read_text())
RESULT = re.compile(r"^RESULT (?P<name>[^=\s]+)=(?P<value>\S+)", re.M)
TIMEOUT_S = 240


def smoke_table(name: str) -> dict[str, list[str]]:
    module = importlib.import_module(f"bench.{name}")
    table = getattr(module, "SMOKE", None)
    assert isinstance(table, dict) and table and all(isinstance(v, list) and v for v in table.values()), (
        f"bench/{name}.py has no SMOKE table: give it a --smoke mode (bench._common.smoke) and "
        "SMOKE = {extra arguments: [RESULT names it prints]}")
    return table


def missing_requirements(name: str) -> list[str]:
    """The modules a benchmark declares it cannot run without (``REQUIRES``) that are not installed."""
    module = importlib.import_module(f"bench.{name}")
    return [m for m in getattr(module, "REQUIRES", ()) if importlib.util.find_spec(m) is None]


def command(name: str, extra: str) -> list[str]:
    return [sys.executable, "-m", f"bench.{name}", "--smoke", *shlex.split(extra)]


def run_case(name: str, extra: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1", "CUDA_VISIBLE_DEVICES": "",
           "TQDM_DISABLE": "1"}
    return subprocess.run(command(name, extra), cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=TIMEOUT_S)


@pytest.fixture(scope="module")
def runs(request):
    """The selected modules' smoke runs, started together (two at a time) on first use."""
    selected = [it.callspec.params["name"] for it in request.session.items
                if it.originalname == "test_smoke_mode_prints_its_results" and hasattr(it, "callspec")]
    pool = ThreadPoolExecutor(max_workers=2)
    futures = {}
    for name in selected:
        try:
            table = smoke_table(name)
        except AssertionError:
            continue  # the test of that module says why
        if missing_requirements(name):
            continue
        for extra in table:
            futures[(name, extra)] = pool.submit(run_case, name, extra)
    yield futures
    pool.shutdown(wait=True, cancel_futures=True)


def test_bench_modules_are_found():
    assert {"search_cost", "masked_forward", "generation", "scaling", "search_quality"} <= set(MODULES)


@pytest.mark.parametrize("name", MODULES)
def test_smoke_mode_prints_its_results(name, runs):
    table = smoke_table(name)
    if missing_requirements(name):
        pytest.skip(f"bench/{name}.py needs {missing_requirements(name)} (not installed)")
    for extra, promised in table.items():
        fut = runs.get((name, extra))
        out = fut.result() if fut is not None else run_case(name, extra)
        cmd = shlex.join(command(name, extra)[1:])
        log = f"python {cmd} (rc {out.returncode})\n--- stdout\n{out.stdout[-3000:]}\n--- stderr\n{out.stderr[-3000:]}"
        assert out.returncode == 0, log
        printed = {}
        for m in RESULT.finditer(out.stdout):
            printed[m["name"]] = m["value"]
        for pattern in promised:
            hits = [n for n in printed if re.fullmatch(pattern, n)]
            assert hits, f"RESULT {pattern} was not printed\n{log}"
            for n in hits:
                value = float(printed[n].rstrip("x"))
                assert math.isfinite(value), f"RESULT {n}={printed[n]} is not a finite number\n{log}"


def test_gpu_script_is_valid_and_names_existing_benchmarks():
    script = BENCH / "gpu.sh"
    check = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert check.returncode == 0, check.stderr
    text = script.read_text()
    named = set(re.findall(r"\bbench\.(\w+)", text))
    assert set(MODULES) & named, "bench/gpu.sh runs no benchmark"
    missing = sorted(n for n in named if not (BENCH / f"{n}.py").is_file())
    assert not missing, f"bench/gpu.sh names benchmarks that do not exist: {missing}"
    # every GPU test file it runs exists
    for path in re.findall(r"\btests/[\w/]+\.py\b", text):
        assert (ROOT / path).is_file(), path
