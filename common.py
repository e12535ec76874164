"""common.py: the machinery every script shares; skip it on a first read. Options (a dataclass whose fields are the
--flags), device and mixed precision, torchrun / DDP helpers, atomic writes, one run per directory, the JSONL training
log. Little here knows Insight-V (nanochat's common.py plays the same part there).
"""

import argparse
import contextlib
import datetime
import errno
import functools
import gc
import glob
import json
import math
import os
import re
import socket
import sys
import tempfile
import time
from dataclasses import MISSING, field, fields
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

try:
    import fcntl  # POSIX file locks (run_lock)
except ImportError:
    fcntl = None

# ----------------------------------------------------------------------------------------------
# Options: dataclasses whose fields are also command-line flags (--train-scenes 500).

# The metadata keys that bound a numeric option: key -> (how the error states it, the test a value must pass).
BOUNDS = {"min": (">=", lambda v, b: v >= b), "above": (">", lambda v, b: v > b), "max": ("<=", lambda v, b: v <= b)}


def parse_config(cls, argv=None, description=None):
    """The one configuration mechanism of every script: a dataclass whose fields become --flags. A field's default is
    the flag's default and its type; its metadata's "help" documents it (see option). Booleans get --flag / --no-flag.
    Fields defaulting to None take strings unless their metadata names a "type" (lists: "nargs": "+"). Numbers get
    their valid range from the metadata keys of BOUNDS ({"min": 1}, {"above": 0, "max": 1}), checked here: a bad value
    never starts work."""
    parser = argparse.ArgumentParser(description=description)
    for f in fields(cls):
        default = f.default if f.default is not MISSING else f.default_factory()
        flag, help_text = "--" + f.name.replace("_", "-"), f.metadata.get("help", "")
        if isinstance(default, bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=help_text)
        else:
            kind = f.metadata.get("type", type(default) if default is not None else str)
            parser.add_argument(flag, type=kind, default=default, help=help_text, choices=f.metadata.get("choices"),
                                nargs=f.metadata.get("nargs"))
    args = parser.parse_args(argv)
    for f in fields(cls):
        value = getattr(args, f.name)
        for key, (sign, ok) in BOUNDS.items():
            if key in f.metadata and value is not None and not ok(value, f.metadata[key]):
                parser.error(f"argument --{f.name.replace('_', '-')}: must be {sign} {f.metadata[key]}, got {value}")
    return cls(**vars(args))


def option(default, text, **metadata):  # a field for parse_config: default, help, metadata (BOUNDS keys, "type")
    return field(default=default, metadata={"help": text, **metadata})


def option_of(cls, name, text=None):
    """Field `name` of config class cls, for another config: the same default and range, and its help unless given."""
    f = next(f for f in fields(cls) if f.name == name)
    return field(default=f.default, metadata={**f.metadata, "help": text or f.metadata.get("help", "")})


# ----------------------------------------------------------------------------------------------
# Files: nothing half-written survives a crash; errors name the file.

def atomic_write(path, write):
    """Call write(tmp_path), then rename over path: a crash never leaves a half-written file. The file gets the
    permissions a plain open() gives under the umask, so others can read a shared checkpoint. The temp file is the
    writer's own (host and pid in its name); a save removes those that killed writers on this host left."""
    folder, name = os.path.split(os.path.abspath(path))
    mine = f".tmp-{name}-{socket.gethostname()}-"  # this host's writers, whose pids can be asked after
    for stale in glob.glob(glob.escape(os.path.join(folder, mine)) + "*") if os.name == "posix" else ():
        try:
            os.kill(int(stale.rsplit("-", 1)[1]), 0)  # signal 0 only asks whether the writer is still alive
        except ProcessLookupError:
            with contextlib.suppress(FileNotFoundError):  # another writer may clear it first
                os.remove(stale)
        except (ValueError, PermissionError):  # not a pid; another user's live process
            pass
    tmp = os.path.join(folder, mine + str(os.getpid()))
    try:
        with writing(path):
            write(tmp)
        umask = os.umask(0)  # reading the umask means setting it: put it back at once
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # safetensors, for one, writes 0600
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


HELD = {}  # the lock files this process holds -> their open file


@contextlib.contextmanager
def run_lock(*paths):
    """One run per output directory: each path gets a .lock file that this run holds an OS lock on (fcntl; none on
    Windows), which the OS drops when the process ends, a crash included. A second run meets a one-line error naming
    the holder; the holder taking it again (train_dpo.py builds the world and the stages in-process) passes."""
    taken = []
    try:
        for path in paths:
            lock = os.path.realpath(os.path.join(writable_dir(path), ".lock"))
            if lock in HELD or fcntl is None or int(os.environ.get("RANK", 0)) > 0:  # torchrun: rank 0 holds it
                continue
            f = HELD[lock] = open(lock, "a+")
            taken.append(lock)
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                f.seek(0)
                holder = f.read().strip() or "starting"
                raise OSError(f"{path} is in use by another run ({holder}): wait for it to end, or choose another "
                              f"--out") from None
            f.truncate(0)
            f.write(f"pid {os.getpid()} on {socket.gethostname()}: python {' '.join(sys.argv)}")
            f.flush()
        yield
    finally:
        for lock in taken:
            HELD.pop(lock).close()


# How a full disk or a file-size limit shows: the OS's errno, or in the message of the error torch.save,
# safetensors and tokenizers raise instead (any other failure is raised as it is).
DISK_FULL = re.compile(r"No space left|File too large|Disk quota|os error (28|27|122)\b|PytorchStreamWriter|"
                       r"inline_container")


class DiskFull(OSError):  # writing's error: raised as it is by an enclosing writing (atomic_write around write_jsonl)
    pass


@contextlib.contextmanager
def writing(path):
    """A write that fails on a full disk or a file-size limit -> one OSError naming the file, from every script."""
    try:
        yield
    except Exception as e:
        full = getattr(e, "errno", None) in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT) or DISK_FULL.search(str(e))
        if isinstance(e, DiskFull) or not full:
            raise
        raise DiskFull(f"{path} could not be written ({type(e).__name__}: {str(e).strip()[:200]}): the disk is full "
                      f"or a file-size limit was met; free space and run the same command again") from None


def write_json(obj, path):
    with open(path, "w") as f:
        json.dump(obj, f, indent=2)


def write_jsonl(path, rows):
    with writing(path), open(path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)


def writable_dir(path, flag="--out"):
    """Create the directory if needed and write a file in it, so work is never lost to a save that cannot happen."""
    try:
        os.makedirs(path, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as e:
        raise OSError(f"{path} is not a writable directory ({e.strerror or e}): choose another {flag}") from None
    return path


# ----------------------------------------------------------------------------------------------
# Device and mixed precision

def resolve_device(name):
    """'auto' -> CUDA if there is one, else the CPU; every script comes here, so here fp32 matmuls get TF32 on a GPU."""
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: no CUDA device here; use --device cpu (or auto)")
    if device.type == "cuda":
        torch.backends.cuda.matmul.fp32_precision = "tf32"  # torch's documented TF32 switch (allow_tf32 is legacy)
    return device


@functools.cache
def cpu_flags(path="/proc/cpuinfo"):
    """The feature flags the CPU reports in /proc/cpuinfo (none where there is no such file or line: not Linux)."""
    try:
        text = Path(path).read_text()
    except OSError:
        return frozenset()
    line = re.search(r"^(?:flags|Features)\s*:(.*)$", text, re.M)  # x86 says flags, Arm says Features
    return frozenset(line[1].split() if line else ())


def cpu_has_bf16(flags, capability):  # AVX512-BF16 or AMX with AVX512 kernels, or Arm's BF16 (docs/experiments.md)
    return (bool(flags & {"avx512_bf16", "amx_bf16"}) and capability == "AVX512") or "bf16" in flags


@functools.cache
def announce(device, choice, why):  # the choice of --precision auto, printed once per script and device
    print0(f"[precision] auto on {device}: {choice} ({why})")


def resolve_precision(device, precision):
    """'auto' -> bf16 on GPUs of capability 8.0+ (is_bf16_supported counts emulation), else fp16; CPU: cpu_has_bf16."""
    device = torch.device(device)
    if precision == "auto":
        if device.type == "cuda":
            capability = torch.cuda.get_device_capability(device)
            choice = "bf16" if capability >= (8, 0) else "fp16"
            announce(str(device), choice, f"compute capability {capability[0]}.{capability[1]}")
            return choice
        capability = torch.backends.cpu.get_cpu_capability()
        choice = "bf16" if device.type == "cpu" and cpu_has_bf16(cpu_flags(), capability) else "fp32"
        announce(device.type, choice, f"torch's CPU kernels {capability}, bf16 arithmetic "
                                      f"{'reported' if choice == 'bf16' else 'not reported'} by the CPU")
        return choice
    if precision == "fp16" and device.type != "cuda":
        raise ValueError("--precision fp16 needs a CUDA device (loss scaling); use bf16 or fp32 here")
    return precision


def autocast(device, precision):
    """Mixed precision: matmuls in bf16 / fp16; weights, optimizer state, norms and the loss stay fp32."""
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(resolve_precision(device, precision))
    return torch.autocast(torch.device(device).type, dtype=dtype) if dtype else contextlib.nullcontext()


def make_scaler(device, precision):
    """A GradScaler, active only for fp16 (whose gradients underflow unless the loss is scaled up first)."""
    return torch.amp.GradScaler(torch.device(device).type, enabled=resolve_precision(device, precision) == "fp16")


@functools.cache
def matmul_peak(device, precision):
    """FLOP/s of a 1024^3 (CPU) or 8192^3 (GPU) matmul in the training dtype, best of 10: the peak that a stage's share
    is taken against (what this device gives one large dense product, not the datasheet's number)."""
    device, n = torch.device(device), 8192 if torch.device(device).type == "cuda" else 1024
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(resolve_precision(device, precision), torch.float32)
    a = torch.full((n, n), 0.5, device=device, dtype=dtype)  # not random: the probe leaves the RNG as it was
    best = float("inf")
    for _ in range(11):  # the first is a warm-up
        start = time.perf_counter()
        (a @ a).sum().item()  # .item(): waits for a GPU to finish
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best


# ----------------------------------------------------------------------------------------------
# Data parallelism. `torchrun --standalone --nproc_per_node=N script.py` starts N copies of a script, one per GPU
# (gloo on the CPU): each runs its share of every step's rows and DDP adds up their gradients in backward, so a step is
# the one-process step; rank 0 alone writes and prints. Without torchrun every helper below leaves the code as it was.

def setup_distributed(device_name):
    """-> (rank, world size, device) of this process: (0, 1, the device) without torchrun, with no process group.
    Under torchrun: one group (NCCL between GPUs, gloo on the CPU), GPU LOCAL_RANK for this process; called again, the
    same."""
    device = resolve_device(device_name)
    if int(os.environ.get("WORLD_SIZE", 1)) == 1:
        return 0, 1, device
    if device.type == "cuda":
        if device.index is not None:
            raise ValueError(f"--device {device_name}: under torchrun each process takes GPU LOCAL_RANK; pass --device "
                             f"cuda (or auto) and pick the GPUs with CUDA_VISIBLE_DEVICES")
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)  # "cuda" now means this GPU, in every later call
    if not dist.is_initialized():
        # The others wait in a collective while rank 0 alone builds data or evaluates: an hour, not NCCL's 10 minutes.
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=datetime.timedelta(hours=1))
    return dist.get_rank(), dist.get_world_size(), device


def cleanup_distributed():  # leave the process group at the end of a script run by torchrun (nothing without it)
    if dist.is_initialized():
        gc.collect()  # DDP wrappers sit in reference cycles that hold the group: gloo can abort if they outlive it
        dist.destroy_process_group()


def distributed():  # (rank, world size) of this process: (0, 1) without torchrun
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def print0(*args):  # print, on rank 0 alone
    if distributed()[0] == 0:
        print(*args)


def interrupted(message):  # Ctrl-C: one line saying what was saved and how to continue; 130, as a shell reports it
    print0(f"interrupted: {message}")
    raise SystemExit(130)


def data_parallel(model):
    """The model in DDP under torchrun (it starts every process from rank 0's weights and averages the gradients over
    the processes in backward), else the model itself. Wrap it after freezing: DDP syncs what requires grad then."""
    if distributed()[1] == 1:
        return model
    device = next(model.parameters()).device
    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def all_reduce_sum(tensor):
    """The tensor summed over the processes (itself without torchrun); stack numbers to send them in one call."""
    if distributed()[1] > 1:
        tensor = tensor.clone()
        dist.all_reduce(tensor)
    return tensor


def all_gather(obj):
    """[process 0's obj, process 1's, ...] on every process ([obj] without torchrun); obj: anything picklable."""
    world = distributed()[1]
    if world == 1:
        return [obj]
    out = [None] * world
    dist.all_gather_object(out, obj)
    return out


def on_rank0(fn, *args, **kwargs):
    """fn(*args, **kwargs) on rank 0 alone, as for files it writes; the others wait for it and get its result too."""
    rank, world = distributed()
    if world == 1:
        return fn(*args, **kwargs)
    out = [fn(*args, **kwargs) if rank == 0 else None]
    dist.broadcast_object_list(out, src=0)
    return out[0]


# ----------------------------------------------------------------------------------------------
# Training: the lr schedule, one optimizer step, the JSONL log

def lr_scale(step, warmup, total, min_ratio=0.1):
    """The lr multiplier at step `step` (from 0) of `total`: linear warmup, then cosine down to min_ratio (nanoGPT's
    get_lr). The one schedule of SFT, DPO and GRPO."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def set_lr(optimizer, peaks, scale):  # every param group's lr = its peak x scale
    for group, peak in zip(optimizer.param_groups, peaks):
        group["lr"] = peak * scale


def diverged(loss, grad_norm, scaler):
    """A NaN / inf loss or grad norm (fp16's scaler skips overflowed steps itself, so there only the loss counts)."""
    return not (math.isfinite(loss) and (scaler.is_enabled() or math.isfinite(grad_norm)))


def divergence_error(loss, grad_norm, where, kept, device, precision):  # fp32 is suggested where not already used
    fix = "a lower --lr" + ("" if resolve_precision(device, precision) == "fp32" else " or --precision fp32")
    return FloatingPointError(f"loss {loss:.4g}, grad norm {grad_norm:.4g} at {where}: training halted; {kept}; "
                              f"try {fix}")


def optimizer_step(model, optimizer, scaler, max_norm, metrics, where, kept, device, precision):
    """The end of train_sft.train_loop's step as one call, for DPO and GRPO (a fix to one is a fix to both): unscale,
    clip, read `metrics` (scalar tensors) and the grad norm in one transfer, halt before the weights change if they
    diverged, step, free the gradients -> {name: float}."""
    scaler.unscale_(optimizer)  # clip the true gradients, not the fp16-scaled ones
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
    values = torch.stack([t.detach().float() for t in (*metrics.values(), grad_norm)]).tolist()
    out = dict(zip([*metrics, "grad_norm"], values))
    if diverged(out["loss"], out["grad_norm"], scaler):
        raise divergence_error(out["loss"], out["grad_norm"], where, kept, device, precision)
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return out


def start_log(path, resume_step=None):
    """A run's JSONL log, on rank 0: removed for a fresh run; for a resumed one cut after resume_step (a crash may
    have logged steps the checkpoint lacks) -> the wall seconds of the kept records (their last elapsed_s)."""
    if distributed()[0] != 0 or not os.path.exists(path):
        return 0.0
    if resume_step is None:
        os.remove(path)
        return 0.0
    kept = [line for line in Path(path).read_text().splitlines(True) if json.loads(line)["step"] <= resume_step]
    atomic_write(path, lambda p: Path(p).write_text("".join(kept)))
    return json.loads(kept[-1]).get("elapsed_s", 0.0) if kept else 0.0


def log_record(path, record):  # one record appended to a JSONL log, on rank 0
    if distributed()[0] == 0:
        with writing(path), open(path, "a") as f:
            f.write(json.dumps(record) + "\n")
