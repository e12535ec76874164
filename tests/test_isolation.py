"""The guard in conftest.py: a test that leaks global torch state fails, the state is put back for the next test."""

from pathlib import Path

LEAKS = '''
import os
import torch

INITIAL_SEED = torch.initial_seed()  # before any test: torch's own

def test_flips_a_backend_flag():
    torch.backends.cudnn.benchmark = not torch.backends.cudnn.benchmark

def test_sets_tf32():
    torch.backends.cuda.matmul.fp32_precision = "tf32"

def test_patches_cuda_availability():
    torch.cuda.is_available = lambda: True

def test_changes_the_default_dtype_and_threads():
    torch.set_default_dtype(torch.float64)
    torch.set_num_threads(1)

def test_sets_an_environment_variable():
    os.environ["MASTER_PORT"] = "29500"

def test_seeding_is_allowed():
    torch.manual_seed(3)
    torch.rand(5)

def test_everything_is_back(monkeypatch):  # runs last: the guard restored what the leaks changed
    # The RNG too: the first draw is the one from torch's initial seed, as if no test had seeded or drawn before.
    assert torch.equal(torch.rand(3), torch.rand(3, generator=torch.Generator().manual_seed(INITIAL_SEED)))
    monkeypatch.setattr(torch, "compile", lambda m: m)  # monkeypatch's own patches are undone before the guard looks
    assert not torch.backends.cudnn.benchmark and torch.backends.cuda.matmul.fp32_precision != "tf32"
    assert torch.get_default_dtype() == torch.float32 and torch.get_num_threads() == NUM_THREADS
    assert torch.cuda.is_available.__module__ == "torch.cuda" and "MASTER_PORT" not in os.environ
'''


def test_the_guard_fails_each_leaking_test_and_restores_the_state(pytester):
    import torch

    pytester.makeconftest(Path(__file__).with_name("conftest.py").read_text())
    pytester.makepyfile(test_leaks=LEAKS.replace("NUM_THREADS", str(torch.get_num_threads())))
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-p", "no:randomly")
    result.assert_outcomes(passed=7, errors=5)
    for test, leak in [("test_flips_a_backend_flag", "cudnn.(enabled, benchmark, deterministic)"),
                       ("test_sets_tf32", "torch.backends.cuda.matmul.fp32_precision"),
                       ("test_patches_cuda_availability", "torch.cuda.is_available"),
                       ("test_changes_the_default_dtype_and_threads", "torch.get_default_dtype(), torch.get_num_threads()"),
                       ("test_sets_an_environment_variable", "os.environ")]:
        result.stdout.fnmatch_lines([f"*ERROR at teardown of {test}*", f"*left global state changed*{leak}*"])
