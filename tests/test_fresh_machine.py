"""What a new user meets on a fresh machine: the README's test command without the dataset, the console
scripts, and the install advice the CLIs print."""
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import NO_DATA, REQUIRE

ROOT = Path(__file__).resolve().parents[1]
# one data-dependent test of each kind: marked ones, ones using a data fixture, and the bundle test that
# used to need the data without saying so (it raised DataError on a machine without it)
DATA_TESTS = ["tests/test_train.py::test_bundle_ships_the_best_checkpoint_with_the_command_that_reproduces_the_run",
              "tests/test_train.py::test_resume_gives_the_same_weights_as_an_uninterrupted_run",
              "tests/test_export.py::test_export_parity_on_omniglot_tasks",
              "tests/test_maml.py::test_five_step_adaptation_equals_paddlerec_loop",
              "tests/test_data.py::test_full_dataset_shape_range_and_spot_check",
              "tests/test_distributed.py::test_distributed_two_ranks_compute_one_process_meta_gradient"]


def pytest_in_a_child(*args, **env) -> subprocess.CompletedProcess:
    environ = {k: v for k, v in os.environ.items() if k not in ("OMNIGLOT_DIR", REQUIRE)}
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", "--no-omniglot",
                           *args], capture_output=True, text=True, cwd=ROOT, env={**environ, **env}, timeout=600)


def test_without_the_dataset_data_tests_skip_with_one_reason_naming_omniglot_dir():
    done = pytest_in_a_child(*DATA_TESTS)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    skips = re.findall(r"^SKIPPED \[(\d+)\] [^:]+:\d+: (.*)$", done.stdout, re.MULTILINE)  # grouped by reason
    assert sum(int(n) for n, _ in skips) == len(DATA_TESTS), done.stdout[-3000:]
    assert {reason for _, reason in skips} == {NO_DATA}, done.stdout[-3000:]
    assert "OMNIGLOT_DIR" in NO_DATA


def test_ci_fails_instead_of_skipping_when_the_dataset_is_missing():
    done = pytest_in_a_child(DATA_TESTS[0], **{REQUIRE: "1"})
    assert done.returncode == 1 and "1 error" in done.stdout, done.stdout[-3000:]  # failed in setup
    assert NO_DATA in done.stdout and f"{REQUIRE}=1" in done.stdout
    ci = (ROOT / ".ci" / "run").read_text()
    assert re.search(rf"^export {REQUIRE}=1\b", ci, re.MULTILINE), "CI must fail, not skip, without the data"


def test_the_data_lookup_is_only_in_conftest():
    """No test module finds the data itself (the lookups and skip reasons used to differ file by file)."""
    for path in sorted((ROOT / "tests").glob("test_*.py")):
        source = path.read_text()
        assert not re.search(r"[\"']shared[\"']|(pytest\.skip|skipif)\(.*(?i:omniglot)", source), path.name


def test_the_readme_apt_line_asks_for_nodejs_and_npm_only_where_npm_is_missing(tmp_path):
    """Where Node.js came from elsewhere (NodeSource, nvm), apt's nodejs conflicts with its npm ("nodejs :
    Conflicts: npm"): the README's line, run by bash with apt-get replaced by echo, asks for them only where
    `npm` is missing, as .ci/run does."""
    lines = [line.split("  #")[0] for line in (ROOT / "README.md").read_text().splitlines() if "apt-get install" in line]
    assert lines, "the README says how to install Chromium"
    with_npm, without = tmp_path / "with-npm", tmp_path / "without"
    with_npm.mkdir()
    without.mkdir()
    (with_npm / "npm").write_text("#!/bin/sh\n")
    (with_npm / "npm").chmod(0o755)
    for line in lines:
        asked = {}
        for name, path in (("with npm", with_npm), ("without npm", without)):
            echo = line.replace("apt-get install -y", "echo", 1)
            done = subprocess.run(["/bin/bash", "-c", echo], capture_output=True, text=True, env={"PATH": str(path)},
                                  timeout=30)
            assert done.returncode == 0, done.stderr
            asked[name] = done.stdout.split()
        assert asked["with npm"] == ["chromium", "chromium-driver"], line
        assert asked["without npm"] == ["chromium", "chromium-driver", "nodejs", "npm"], line


# --- maml-train: the trainer's CLI, from any folder -----------------------------------------------------------

def console_script(name: str, bindir: Path) -> Path:
    """The wrapper pip writes for pyproject's [project.scripts] entry `name` (distlib's template)."""
    import tomllib
    module, func = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"][name].split(":")
    bindir.mkdir(exist_ok=True)
    script = bindir / name
    script.write_text(f"import re\nimport sys\nfrom {module} import {func}\nif __name__ == '__main__':\n"
                      f"    sys.argv[0] = re.sub(r'(-script\\.pyw|\\.exe)?$', '', sys.argv[0])\n    sys.exit({func}())\n")
    return script


def test_maml_train_runs_the_trainer_where_a_local_train_py_shadows_python_m_train(tmp_path):
    work = tmp_path / "my-project"
    work.mkdir()
    (work / "train.py").write_text("raise SystemExit('the local train.py ran')\n")  # a user's own training script
    env = {**os.environ, "PYTHONPATH": str(ROOT)}  # the package as site-packages would hold it
    shadowed = subprocess.run([sys.executable, "-m", "train", "--help"], capture_output=True, text=True, cwd=work,
                              env=env, timeout=120)
    assert "the local train.py ran" in shadowed.stderr  # what `python -m train` does there
    script = console_script("maml-train", tmp_path / "bin")
    done = subprocess.run([sys.executable, str(script), "--help"], capture_output=True, text=True, cwd=work, env=env,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("Usage: maml-train ") and "--resume" in done.stdout and "evaluate" in done.stdout
    readme = (ROOT / "README.md").read_text()
    assert "maml-train" in readme and "python -m train" in readme


# --- the GPU advice -----------------------------------------------------------------------------------------------

def test_gpu_advice_is_a_command_pip_accepts_and_leaves_one_onnxruntime():
    import tomllib

    from packaging.requirements import Requirement

    from maml_export.cli import GPU_INSTALL, GPU_REQUIREMENT
    from maml_export.bench.runtimes import INSTALL
    assert INSTALL == GPU_INSTALL
    uninstall, install = (shlex.split(part) for part in GPU_INSTALL.split(" && "))
    # from any state (CPU build, GPU build, or the clashing pair) both builds go, then the GPU one comes
    assert uninstall[:3] == ["pip", "uninstall", "-y"] and set(uninstall[3:]) == {"onnxruntime", "onnxruntime-gpu"}
    assert install[:2] == ["pip", "install"] and install[2:] == [GPU_REQUIREMENT]
    requirement = Requirement(GPU_REQUIREMENT)  # what pip parses, without the network
    assert requirement.name == "onnxruntime-gpu" and not requirement.extras and requirement.specifier
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    base = [Requirement(r) for r in project["dependencies"]]
    floor = next(r for r in base if r.name == "onnxruntime").specifier
    assert all(floor.contains(str(s.version)) for s in requirement.specifier)  # a version the project accepts
    # pip itself accepts the argument: with no index it fails only for want of a download
    dry = subprocess.run([sys.executable, "-m", "pip", "install", "--dry-run", "--no-index", "--no-deps",
                          *install[2:]], capture_output=True, text=True, timeout=120)
    assert dry.returncode != 0 and "Invalid requirement" not in dry.stderr
    assert "No matching distribution found for onnxruntime-gpu" in dry.stderr, dry.stderr
    # no extra installs a second onnxruntime beside the base one (the clash both builds' files make)
    for extra, requirements in project["optional-dependencies"].items():
        runtimes = {r.name for r in base + [Requirement(x) for x in requirements] if r.name.startswith("onnxruntime")}
        assert runtimes == {"onnxruntime"}, extra
    assert GPU_INSTALL in (ROOT / "pyproject.toml").read_text()
    assert "maml-export[gpu]" not in (ROOT / "README.md").read_text()
    help_text = subprocess.run([sys.executable, "-m", "bench", "--help"], capture_output=True, text=True, cwd=ROOT,
                               timeout=120).stdout
    assert "".join(GPU_INSTALL.split()) in "".join(help_text.split())  # as wrapped, perhaps at a hyphen


# --- the same conventions in every CLI ------------------------------------------------------------------------------

PREDICT = ["-m", "export.predict", "--model", "m.onnx", "--support", "s", "--query", "q"]


@pytest.mark.parametrize("args, code, message", [
    (["-m", "train", "--threads", "0"], 2, "--threads"),
    (["-m", "train", "evaluate", "--threads", "0"], 2, "--threads"),
    ([*PREDICT, "--threads", "0"], 2, "--threads"),
    (["-m", "bench", "--threads", "0"], 2, "--threads"),
    (["-m", "bench.train_speed", "--threads", "0"], 2, "--threads"),
    (["-m", "bench.train_speed", "--ways", "1"], 2, "--ways"),
    (["-m", "train", "--ways", "1"], 2, "--ways must be at least 2"),
    (["-m", "train", "--ways", "0"], 2, "--ways must be at least 2, got 0"),  # one bound, not "at least 1" here
    (["-m", "train", "--val-ways", "0", "--zero-head"], 2, "--val-ways must be at least 2, got 0"),
    (["-m", "bench", "--configs", "1w1s"], 2, "N >= 2"),
    (["-m", "export", "--steps", "0"], 2, "--steps"),
    (["-m", "export", "--steps", "1000"], 2, "'--steps': 1000 is not in the range 1<=x<=20"),  # before any work
    (["-m", "bench", "--steps", "21"], 2, "'--steps': 21 is not in the range 1<=x<=20"),  # bench exports too
    (["-m", "train", "evaluate", "--tasks", "0"], 2, "--tasks"),
    (["-m", "train", "--data", "/nonexistent/omniglot", "--out", "{tmp}/run"], 1, "/nonexistent/omniglot does not exist"),
    (["-m", "export", "--checkpoint", "/nonexistent/c.npz", "--out", "{tmp}/exp"], 1, "/nonexistent/c.npz does not exist"),
], ids=lambda a: " ".join(a) if isinstance(a, list) else None)
def test_every_cli_exits_2_on_a_usage_error_and_1_on_a_failure(args, code, message, tmp_path):
    done = subprocess.run([sys.executable, *(a.format(tmp=tmp_path) for a in args)], capture_output=True, text=True,
                          cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=300)
    assert done.returncode == code and message in done.stderr, done.stderr
    assert "Traceback" not in done.stderr


def run_unconfigured(probe: str) -> None:
    """Run the Python code `probe` in a child without the settings `process.configure()` makes (this test run
    made them, and children inherit the environment); it must exit 0."""
    environ = {k: v for k, v in os.environ.items() if k not in ("MKL_DEBUG_CPU_TYPE", "GLOG_minloglevel")}
    run = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=ROOT, env=environ,
                         timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]


PADDLE_FREE = ["maml_export", "maml_export.config", "maml_export.specs", "maml_export.contract", "maml_export.adapter",
               "maml_export.calibration", "maml_export.protocol", "maml_export.process", "maml_export.bench",
               "maml_export.bench.kit"]


@pytest.mark.parametrize("module", PADDLE_FREE)
def test_modules_a_deployment_reads_import_without_paddle_and_change_nothing(module):
    """A Paddle-free module imports without Paddle, and importing any of them leaves the process as it was: the
    environment, glibc's allocator and the warning filters are set by `process.configure()` (the CLIs call it)."""
    probe = f"""import os, sys, warnings
import click, numpy, onnxruntime  # third-party imports' own filters (numpy adds some) are not ours
env, filters = dict(os.environ), list(warnings.filters)
import {module}
assert "paddle" not in sys.modules, "imports paddle"
assert dict(os.environ) == env, set(os.environ.items()) ^ set(env.items())
assert list(warnings.filters) == filters, "warning filters changed"
"""
    run_unconfigured(probe)


def test_process_configure_sets_what_the_clis_run_under():
    probe = """import os, warnings
from maml_export.process import configure
configure()
assert os.environ["MKL_DEBUG_CPU_TYPE"] == "5" and os.environ["GLOG_minloglevel"] == "2"
assert any("ccache" in str(f[1].pattern) for f in warnings.filters if f[1] is not None)
"""
    run_unconfigured(probe)
