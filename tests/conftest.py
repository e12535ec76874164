"""Tests cannot poison each other: every test runs between a snapshot of torch's process-wide state and a check of it.

A test that leaves a backend flag flipped, torch.cuda.is_available patched, another default dtype or thread count,
or an environment variable behind would change what every later test sees, so the suite's result would depend on
its order. The guard fails such a test (an error at its teardown, naming what it changed) and puts the state back.
Random number generators are different: seeding them is what tests do, so the guard restores them silently.
"""

import os
import random

import numpy as np
import pytest
import torch

# torch's first optimizer imports its compiler, which wraps torch.manual_seed and sets an environment variable: made
# once here, so that whichever test comes first is not taken for a leak.
torch.optim.AdamW([torch.zeros(1, requires_grad=True)])

# Modules whose functions tests patch (monkeypatch undoes its own patches before this guard looks).
PATCHABLE = {"torch": torch, "torch.cuda": torch.cuda, "torch.Tensor": torch.Tensor, "torch.nn.Module": torch.nn.Module,
             "torch.optim": torch.optim, "torch.backends.cuda": torch.backends.cuda}


def global_state():
    """{name: value} of the process-wide settings a test could leave changed."""
    b = torch.backends
    state = {
        "torch.get_default_dtype()": torch.get_default_dtype(),
        "torch.get_num_threads()": torch.get_num_threads(),
        "torch.is_grad_enabled()": torch.is_grad_enabled(),
        "torch.is_anomaly_enabled()": torch.is_anomaly_enabled(),
        "torch.are_deterministic_algorithms_enabled()": torch.are_deterministic_algorithms_enabled(),
        "torch.backends.cuda.matmul.fp32_precision": b.cuda.matmul.fp32_precision,
        "torch.backends.cudnn.conv.fp32_precision": b.cudnn.conv.fp32_precision,
        "torch.backends.mkldnn.matmul.fp32_precision": b.mkldnn.matmul.fp32_precision,
        "torch.backends.cudnn.(enabled, benchmark, deterministic)": (b.cudnn.enabled, b.cudnn.benchmark,
                                                                      b.cudnn.deterministic),
        "SDPA backends (flash, mem_efficient, math, cudnn)": (b.cuda.flash_sdp_enabled(), b.cuda.mem_efficient_sdp_enabled(),
                                                              b.cuda.math_sdp_enabled(), b.cuda.cudnn_sdp_enabled()),
        "os.environ": {k: v for k, v in os.environ.items() if k != "PYTEST_CURRENT_TEST"},  # pytest's own
    }
    return state


def module_attributes():
    """{module.name: object} of the modules tests patch; compared by identity."""
    return {f"{name}.{key}": value for name, module in PATCHABLE.items() for key, value in vars(module).items()}


def restore(name, value):
    """Put one entry of global_state() back."""
    b = torch.backends
    if name == "os.environ":
        for key in set(os.environ) - set(value) - {"PYTEST_CURRENT_TEST"}:
            del os.environ[key]
        os.environ.update(value)
    elif name.endswith("fp32_precision"):
        obj, attr = name.rsplit(".", 1)
        setattr({"torch.backends.cuda.matmul": b.cuda.matmul, "torch.backends.cudnn.conv": b.cudnn.conv,
                 "torch.backends.mkldnn.matmul": b.mkldnn.matmul}[obj], attr, value)
    elif name.startswith("torch.backends.cudnn.("):
        b.cudnn.enabled, b.cudnn.benchmark, b.cudnn.deterministic = value
    elif name.startswith("SDPA"):
        for enable, on in zip((b.cuda.enable_flash_sdp, b.cuda.enable_mem_efficient_sdp, b.cuda.enable_math_sdp,
                               b.cuda.enable_cudnn_sdp), value):
            enable(on)
    elif name.endswith("()"):
        setter = {"torch.get_default_dtype()": torch.set_default_dtype, "torch.get_num_threads()": torch.set_num_threads,
                  "torch.is_grad_enabled()": torch.set_grad_enabled, "torch.is_anomaly_enabled()": torch.set_anomaly_enabled,
                  "torch.are_deterministic_algorithms_enabled()": torch.use_deterministic_algorithms}[name]
        setter(value)
    else:  # a module attribute
        module, attr = name.rsplit(".", 1)
        setattr(PATCHABLE[module], attr, value)


@pytest.fixture(autouse=True)
def no_leaked_global_state():
    # Autouse fixtures are set up first, so this one is torn down last: after monkeypatch has undone its patches.
    before, attributes = global_state(), module_attributes()
    rngs = torch.get_rng_state(), random.getstate(), np.random.get_state()
    yield
    torch.set_rng_state(rngs[0])
    random.setstate(rngs[1])
    np.random.set_state(rngs[2])
    after, now = global_state(), module_attributes()
    changed = [name for name, value in before.items() if after[name] != value]
    # Attributes only in `now` are lazily imported submodules, not changes; a replaced or removed one is.
    changed += [name for name, value in attributes.items() if now.get(name, restore) is not value]
    for name in changed:
        restore(name, before[name] if name in before else attributes[name])
    if changed:
        pytest.fail("the test left global state changed (restored now): " + ", ".join(changed), pytrace=False)


def pytest_terminal_summary(terminalreporter):
    terminalreporter.write_line(f"tested on torch {torch.__version__}, numpy {np.__version__}")
