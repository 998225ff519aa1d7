"""What a new user meets on a fresh machine: the README's test command without the dataset, the console
scripts, and the install advice the CLIs print."""
import os
import re
import subprocess
import sys
from pathlib import Path

from conftest import NO_DATA, REQUIRE

ROOT = Path(__file__).resolve().parents[1]
# one data-dependent test of each kind: marked ones, ones using a data fixture, and the bundle test that
# used to need the data without saying so (it raised DataError on a machine without it)
DATA_TESTS = ["tests/test_train.py::test_bundle_ships_the_best_checkpoint_with_the_command_that_reproduces_the_run",
              "tests/test_train.py::test_resume_gives_the_same_weights_as_an_uninterrupted_run",
              "tests/test_export.py::test_export_parity_on_omniglot_tasks",
              "tests/test_maml.py::test_five_step_adaptation_equals_paddlerec_loop",
              "tests/test_data.py::test_full_dataset_shape_range_and_spot_check",
              "tests/test_distributed.py::test_distributed_two_ranks_equal_one_process"]


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
