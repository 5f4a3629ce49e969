"""common.py: distributed set-up, rank-0 logging (and reading the logs back), checkpoint and feature-cache
plumbing shared by the stages.

One function reads RANK / LOCAL_RANK / WORLD_SIZE (`setup_dist`); without them the same code runs as one
process. nccl on GPU, gloo on CPU. Checkpoints are directories written atomically (a temporary name, then a
rename): `OUT/step_000120/` holds the model (model.save_model), `trainer_state.json` (step, data position,
arguments) and `optimizer.pt` (optimiser, scheduler and RNG states: tensors and plain Python only, loaded
with weights_only=True). `OUT/latest` names the newest step directory; `OUT/final/` is the last model.
A failed write (full or read-only disk; whatever the library raises: OSError, torch.save's RuntimeError,
safetensors' SafetensorError) removes its partial files and ends the run with one message naming the path and
the cause (`writing`, `write_error`).

Output folders (`check_out`, `start_run`): a folder that holds a run is refused unless `--resume` (which must
not change what the run computes) or `--overwrite` (which deletes the old run's files, nothing else, once the
new run has passed its checks); what a killed run left there is removed when the next one starts. A run stopped
by a signal saves and exits with 128 + the signal number. Flag rules shared by the stages' check_args:
`at_least`, `positive`, `check_device`, `refuse`.
"""

import contextlib
import dataclasses
import errno
import hashlib
import json
import math
import os
import random
import re
import shutil
import signal
import socket
import sys
import time
import traceback
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.distributed as dist
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

import data
import model as model_lib

# ----------------------------------------------------------------------------------------------------------
# Distributed


@dataclass
class Dist:
    rank: int = 0
    local_rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        return self.rank == 0


def torchrun_ranks() -> tuple:
    """(rank, local rank, world size) from torchrun's environment; (0, 0, 1) without it."""
    return tuple(int(os.environ.get(k, d)) for k, d in (("RANK", 0), ("LOCAL_RANK", 0), ("WORLD_SIZE", 1)))


def setup_dist(device: str | None = None) -> Dist:
    """Read the torchrun environment and start the process group (nccl on GPU, gloo on CPU). Each rank takes
    cuda:LOCAL_RANK; a single process takes the index --device names (cuda:1), if any. check_device first."""
    rank, local_rank, world = torchrun_ranks()
    use_cuda = torch.cuda.is_available() if device is None else device.startswith("cuda")
    if use_cuda:
        index = torch.device(device).index if device and world == 1 else None
        dev = torch.device("cuda", local_rank if index is None else index)
        torch.cuda.set_device(dev)
    else:
        dev = torch.device("cpu")
        if world > 1 and "OMP_NUM_THREADS" not in os.environ:
            # share the CPU cores between the ranks instead of each rank taking them all
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    if world > 1:
        dist.init_process_group("nccl" if use_cuda else "gloo", rank=rank, world_size=world)
    return Dist(rank, local_rank, world, dev)


def check_device(device: str | None) -> list:
    """The problem with --device, if any: it must name a device of this machine that the stages run on (cpu,
    cuda, cuda:N; under torchrun every rank takes cuda:LOCAL_RANK, so no index). None: cuda when available."""
    if device is None:
        return []
    try:
        dev = torch.device(device)
    except RuntimeError:
        return [f"--device {device!r}: not a device; use cpu or cuda (cuda:N for one GPU)"]
    if dev.type == "cpu":
        return [] if dev.index is None else [f"--device {device}: use cpu (the CPU has no index)"]
    if dev.type != "cuda":
        return [f"--device {device}: not supported; use cpu or cuda"]
    if not torch.cuda.is_available():
        build = "this torch build has no CUDA" if torch.version.cuda is None else "no CUDA GPU is visible"
        return [f"--device {device}: CUDA is not available here ({build}); use --device cpu"]
    n, (_, local_rank, world) = torch.cuda.device_count(), torchrun_ranks()
    if world > 1 and dev.index is not None:
        return [f"--device {device}: under torchrun each rank takes cuda:LOCAL_RANK; pass --device cuda"]
    if max(dev.index or 0, local_rank) >= n:
        return [f"--device {device}: this machine has {n} CUDA device(s), cuda:0 to cuda:{n - 1}"
                + (f", and this is local rank {local_rank}" if world > 1 else "")]
    return []


def at_least(args, low, *names) -> list:
    """A problem for each flag `names` of `args` that is not a finite number >= low (None: the default)."""
    return [f"--{n} {getattr(args, n)}: must be at least {low}" for n in names
            if getattr(args, n) is not None and not _finite_at_least(getattr(args, n), low)]


def positive(args, *names) -> list:
    """A problem for each flag `names` of `args` that is not a finite number > 0 (None: the default)."""
    return [f"--{n} {getattr(args, n)}: must be a positive number" for n in names
            if getattr(args, n) is not None and not (_finite_at_least(getattr(args, n), 0) and getattr(args, n) > 0)]


def _finite_at_least(value, low) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value >= low  # NaN fails every test


def refuse(problems: list):
    """End the run before any work when a stage's check_args found problems: one message, all of them."""
    if problems:
        raise SystemExit("error: " + "; ".join(problems))


def cleanup_dist():
    if dist.is_initialized():
        dist.destroy_process_group()


def barrier():
    if dist.is_initialized():
        dist.barrier()


def all_reduce_sum(values: list, device) -> list:
    """Sum floats over ranks (one collective for the whole list)."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_initialized():
        dist.all_reduce(t)
    return t.tolist()


def all_reduce_max(value: float, device) -> float:
    t = torch.tensor([value], dtype=torch.float64, device=device)
    if dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.item()


def global_batch(n_examples: int, batch_size: int, step: int, seed: int) -> list:
    """Example indices of optimiser step `step`: epochs are seeded permutations cut into whole batches, so the
    data order is a pure function of (seed, step) and a resumed run sees exactly what it would have seen."""
    per_epoch = n_examples // batch_size
    epoch, i = divmod(step, per_epoch)
    order = torch.randperm(n_examples, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
    return order[i * batch_size:(i + 1) * batch_size].tolist()


def seed_everything(seed: int):
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# ----------------------------------------------------------------------------------------------------------
# Logging


class Logger:
    """Rank 0 prints one line per log step and appends the metrics to OUT/metrics.jsonl."""

    def __init__(self, out: str, main: bool, write=print):
        self.main, self.write = main, write
        self.path = os.path.join(out, "metrics.jsonl")

    def log(self, step: int, metrics: dict, prefix: str = ""):
        if not self.main:
            return
        line = json.dumps({"step": step, "time": time.time(), **metrics}) + "\n"
        with open_for_append(self.path) as f:  # a failed write: the file as it was, and one message
            f.write(line)
        shown = "  ".join(f"{k.split('/', 1)[-1]} {_short(v)}" for k, v in metrics.items()
                          if isinstance(v, (int, float)))
        self.write(f"{prefix}step {step:>6}  {shown}")


def _short(v) -> str:
    if isinstance(v, int):
        return str(v)
    return f"{v:.4g}"


# ----------------------------------------------------------------------------------------------------------
# Writes that fail: one message, nothing left behind

# What a failed write raises: open / json / os.replace / the tokenizer's files an OSError; torch.save a
# RuntimeError ("[enforce fail at inline_container.cc:...] unexpected pos ...", "basic_ios::clear: iostream
# error"), with no errno; safetensors a SafetensorError ("I/O error: No space left on device (os error 28)").
WRITE_ERRORS = (OSError, RuntimeError, SafetensorError)
WHY = {errno.ENOSPC: "the disk is full", errno.EDQUOT: "the disk quota is exceeded",
       errno.EROFS: "the file system is read-only", errno.EACCES: "permission denied",
       errno.EPERM: "permission denied", errno.EFBIG: "the file is too large for this file system"}
FULL_BELOW = 1 << 20  # bytes: a write that failed with less space than this left (or 1% of a small disk) found
# the disk full; a write that fails on a full disk leaves at most a few blocks


def write_error(path: str, e: Exception) -> SystemExit:
    """The one message for a failed write: which path, and why in words. The reason is the error's errno (an
    OSError's, or the "(os error N)" that Rust's I/O errors print, as safetensors' do); torch.save's
    RuntimeError carries none, so there a file system left with next to no free space is "the disk is full",
    and anything else is the library's own words. Build it BEFORE removing partial files, which frees space."""
    code = e.errno if isinstance(e, OSError) and e.errno else _os_error_code(str(e))
    if code in WHY:
        why = WHY[code]
    elif code is None and disk_is_full(path):
        why = "the disk is full"
    elif isinstance(e, OSError) and e.strerror:
        why = e.strerror
    else:
        why = f"{type(e).__name__}: " + " ".join(str(e).split())  # one line
    return SystemExit(f"error: cannot write {path}: {why}")


def _os_error_code(text: str) -> int | None:
    found = re.search(r"\(os error (\d+)\)", text)
    return int(found.group(1)) if found else None


def disk_is_full(path: str) -> bool:
    """Whether the file system holding `path` (or its nearest existing parent) has next to no space left for
    us: less than FULL_BELOW bytes and less than 1% of its size (root may use the blocks reserved for root,
    others may not)."""
    folder = os.path.abspath(path)
    while not os.path.exists(folder) and os.path.dirname(folder) != folder:
        folder = os.path.dirname(folder)
    try:
        st = os.statvfs(folder)
    except OSError:
        return False
    free = st.f_bfree if os.geteuid() == 0 else st.f_bavail
    return free * st.f_frsize < min(FULL_BELOW, st.f_blocks * st.f_frsize / 100)


@contextlib.contextmanager
def writing(path: str, partial=()):
    """Run a write of `path`: if it fails (WRITE_ERRORS), remove the `partial` files and folders it leaves and
    end the run with write_error's one message."""
    try:
        yield
    except WRITE_ERRORS as e:
        error = write_error(path, e)  # before the clean-up frees the space
        # NOTE: the library's frames may hold the file open (torch.save's writer, in the traceback of the error
        # or of the one it was raised while handling): a removed file keeps its space until it is closed
        cause = e
        while cause is not None:
            traceback.clear_frames(cause.__traceback__)
            cause = cause.__context__
        for p in partial:
            _remove(p)
        raise error from None


@contextlib.contextmanager
def open_for_append(path: str):
    """open(path, "a") whose failed write (a full disk) cuts the file back to what it held, so no half line
    stays behind, and ends the run with one message."""
    size = os.path.getsize(path) if os.path.isfile(path) else None
    try:
        with open(path, "a") as f:
            yield f
    except OSError as e:
        error = write_error(path, e)
        with contextlib.suppress(OSError):
            if size is None:
                os.remove(path)
            else:
                os.truncate(path, size)
        raise error from None


def ensure_writable(folder: str, keep: bool = True):
    """Write and remove a probe file in `folder` now, so an unwritable folder fails before the long work.
    keep=False leaves no trace: folders it had to create are removed again (a run refused later leaves nothing)."""
    made = _missing_parents(folder)
    probe = os.path.join(folder, f".write_test_{os.getpid()}")
    try:
        os.makedirs(folder, exist_ok=True)
        with open(probe, "w") as f:
            f.write("ok\n")
    except OSError as e:
        raise write_error(folder, e) from None
    finally:
        with contextlib.suppress(OSError):
            os.remove(probe)
        if not keep:
            for path in made:  # deepest first
                with contextlib.suppress(OSError):
                    os.rmdir(path)


def _missing_parents(folder: str) -> list:
    """`folder` and those of its parents that do not exist, deepest first."""
    missing, path = [], os.path.abspath(folder)
    while not os.path.exists(path) and os.path.dirname(path) != path:
        missing.append(path)
        path = os.path.dirname(path)
    return missing


def _share_mode(path: str):
    """Give files written by libraries that create them private (safetensors: 0600) the mode that open() gives
    every other file of the run (0666 minus the umask); folders get 0777 minus the umask."""
    umask = os.umask(0)
    os.umask(umask)
    if os.path.isfile(path):
        os.chmod(path, 0o666 & ~umask)
    for folder, _, names in os.walk(path):
        os.chmod(folder, 0o777 & ~umask)
        for name in names:
            os.chmod(os.path.join(folder, name), 0o666 & ~umask)


def read_metrics(path: str) -> tuple:
    """The complete lines of a metrics.jsonl, and the numbers of the incomplete ones (a run killed while writing
    leaves a cut last line)."""
    rows, bad = [], []
    with open(path, encoding="utf-8", errors="replace") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError:
                row = None
            if isinstance(row, dict) and isinstance(row.get("step"), int):
                rows.append(row)
            else:
                bad.append(number)
    return rows, bad


def parse_args(cls, argv=None):
    """Parse a dataclass of arguments with transformers.HfArgumentParser; unknown flags are an error."""
    from transformers import HfArgumentParser
    parser = HfArgumentParser(cls)
    args, rest = parser.parse_args_into_dataclasses(argv, return_remaining_strings=True)
    if rest:
        parser.error(f"unknown arguments: {' '.join(rest)}")
    return args


# ----------------------------------------------------------------------------------------------------------
# Output folders

# flags that cannot change the weights a run produces: --resume may change them (and says so)
SAFE_CHANGES = ("stop_after", "log_every", "show_every", "eval_every", "save_every",
                "keep_last", "device", "feature_cache")


def run_files(out: str) -> list:
    """The entries of OUT that a run writes: arguments, metrics, checkpoints, the pointer, partial writes."""
    if not os.path.isdir(out):
        return []
    return sorted(n for n in os.listdir(out) if n in ("args.json", "metrics.jsonl", "latest", "final")
                  or n.startswith("step_") or is_leftover(n))


def is_leftover(name: str) -> bool:
    """A partial write that a killed run leaves in OUT: a checkpoint folder (.tmp_NAME_PID), the pointer, args
    or metrics being replaced (*.tmp), a write probe (.write_test_PID)."""
    return name.startswith((".tmp_", ".write_test_")) or name in ("latest.tmp", "args.json.tmp", "metrics.jsonl.tmp")


def changed_args(args, saved: dict, grow=()) -> tuple:
    """(refused, allowed): '--flag old -> new' for each argument that differs from `saved` (the arguments of
    the checkpoint). SAFE_CHANGES are allowed, and so is a larger value of a flag in `grow`."""
    now = json.loads(json.dumps(asdict(args), default=str))
    defaults = {f.name: f.default for f in dataclasses.fields(args)}
    refused, allowed = [], []
    for k, v in now.items():
        old = saved.get(k, defaults.get(k))  # a flag newer than the checkpoint: it ran with the default
        if old == v or k in ("resume", "overwrite"):
            continue
        larger = k in grow and isinstance(v, (int, float)) and isinstance(old, (int, float)) and v > old
        (allowed if k in SAFE_CHANGES or larger else refused).append(f"--{k} {old} -> {v}")
    return refused, allowed


def check_out(args, main: bool = True, say=print, grow=()) -> str | None:
    """Check the output folder before any long work and return the checkpoint to resume from (or None).

    A folder that holds a run needs --resume or --overwrite. --resume compares the arguments with those the
    latest checkpoint was trained with and refuses a change that alters the run, naming the flags (SAFE_CHANGES
    and a larger value of a `grow` flag pass, and are printed). The folder must be writable. Partial writes that
    a killed run left behind (is_leftover) are removed first: they may be what fills the disk."""
    out = args.out
    if args.resume and args.overwrite:
        raise SystemExit("error: --resume continues the run in --out, --overwrite deletes it: choose one")
    used = [n for n in run_files(out) if not is_leftover(n)]
    resume_from = None
    if args.resume:
        resume_from = latest_checkpoint(out)
        if resume_from is None:
            raise SystemExit(f"error: --resume, but {out} has no checkpoint (no {out}/latest)"
                             + ("; start over with --overwrite" if used else ""))
        with open(os.path.join(resume_from, "trainer_state.json")) as f:
            state = json.load(f)
        refused, allowed = changed_args(args, state.get("args", {}), grow)
        if refused:
            raise SystemExit(f"error: --resume would change what the run computes: {', '.join(refused)} "
                             f"(the checkpoint {resume_from} was trained with the old values; resume with them, "
                             f"or start a new run in another --out)")
        if allowed:
            say(f"resuming with changed flags that do not alter the run: {', '.join(allowed)}")
    elif used and not args.overwrite:
        raise SystemExit(f"error: --out {out} holds a run already ({', '.join(used[:5])}): continue it with "
                         f"--resume, replace it with --overwrite, or choose another --out")
    if main:  # only rank 0 writes in OUT
        for name in run_files(out):
            if is_leftover(name):
                _remove(os.path.join(out, name))
        ensure_writable(out, keep=False)  # a run refused later must not leave an empty OUT behind
    return resume_from


def start_run(args, main: bool, resumed_at: int | None = None):
    """Call once the run has passed every check, before the first step: --overwrite deletes the old run's
    files now (only them: other files in --out stay); a resumed run drops the metrics logged after its
    checkpoint (a killed run logged steps it never saved: they would appear twice); args.json is written.
    Rank 0 only."""
    if not main:
        return
    path = os.path.join(args.out, "args.json")
    metrics = os.path.join(args.out, "metrics.jsonl")
    with writing(args.out, partial=(path + ".tmp", metrics + ".tmp")):
        os.makedirs(args.out, exist_ok=True)
        if args.overwrite:
            for name in run_files(args.out):
                _remove(os.path.join(args.out, name))
        if resumed_at is not None and os.path.isfile(metrics):
            with open(metrics) as f:
                keep = [line for line in f if _logged_step(line) <= resumed_at]
            with writing(metrics, partial=(metrics + ".tmp",)):
                with open(metrics + ".tmp", "w") as f:
                    f.writelines(keep)
                os.replace(metrics + ".tmp", metrics)
        with writing(path, partial=(path + ".tmp",)):
            with open(path + ".tmp", "w") as f:
                json.dump(asdict(args), f, indent=1)
            os.replace(path + ".tmp", path)


def _logged_step(line: str) -> float:
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):  # a line cut short by the crash
        return float("inf")


def _remove(path: str):
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    elif os.path.lexists(path):
        os.remove(path)


# ----------------------------------------------------------------------------------------------------------
# Checkpoints


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": list(random.getstate()[1]),
             "python_version": random.getstate()[0], "python_gauss": random.getstate()[2],
             "numpy": np.random.get_state()[1].tolist(), "numpy_pos": int(np.random.get_state()[2])}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict):
    torch.set_rng_state(state["torch"])
    random.setstate((state["python_version"], tuple(state["python"]), state["python_gauss"]))
    np.random.set_state(("MT19937", np.array(state["numpy"], dtype=np.uint32), state["numpy_pos"], 0, 0.0))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def save_checkpoint(out: str, name: str, model, optimizer=None, scheduler=None, state: dict | None = None,
                    keep_last: int = 0):
    """Atomically write OUT/name/ (model + trainer state) and point OUT/latest at it. Rank 0 only. A failed
    write (full or read-only disk) removes its partial files, so they cannot keep the disk full, and ends
    the run with one message; `latest` keeps pointing at the last complete checkpoint."""
    final = os.path.join(out, name)
    tmp = os.path.join(out, f".tmp_{name}_{os.getpid()}")
    pointer = os.path.join(out, "latest.tmp")
    with writing(final, partial=(tmp, pointer)):  # whatever the library raises: one message, no partial files
        _remove(tmp)
        model_lib.save_model(model, tmp)
        with open(os.path.join(tmp, "trainer_state.json"), "w") as f:
            json.dump(state or {}, f, indent=1, default=str)
        if optimizer is not None:
            torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict() if scheduler else None,
                        "rng": _rng_state()}, os.path.join(tmp, "optimizer.pt"))
        _share_mode(tmp)
        if os.path.exists(final):
            shutil.rmtree(final)
        os.replace(tmp, final)
        if name.startswith("step_"):
            with open(pointer, "w") as f:
                f.write(name + "\n")
            os.replace(pointer, os.path.join(out, "latest"))
    if name.startswith("step_") and keep_last:
        steps = sorted(d for d in os.listdir(out) if d.startswith("step_"))
        for old in steps[:-keep_last]:
            shutil.rmtree(os.path.join(out, old), ignore_errors=True)
    return final


def latest_checkpoint(out: str) -> str | None:
    pointer = os.path.join(out, "latest")
    if not os.path.isfile(pointer):
        return None
    path = os.path.join(out, open(pointer).read().strip())
    return path if os.path.isfile(os.path.join(path, "config.json")) else None


def resolve_checkpoint(path: str) -> str:
    """A checkpoint directory, or a run directory (its final/, else its latest step)."""
    if os.path.isfile(os.path.join(path, "config.json")):
        return path
    if os.path.isfile(os.path.join(path, "final", "config.json")):
        return os.path.join(path, "final")
    latest = latest_checkpoint(path)
    if latest:
        return latest
    raise FileNotFoundError(f"{path}: no checkpoint there (no config.json, final/ or latest)")


def load_trainer_state(path: str, optimizer, scheduler) -> dict:
    """Restore optimiser, scheduler and RNG states saved by save_checkpoint; returns trainer_state.json."""
    blob = torch.load(os.path.join(path, "optimizer.pt"), weights_only=True, map_location="cpu")
    optimizer.load_state_dict(blob["optimizer"])
    if scheduler is not None and blob["scheduler"] is not None:
        scheduler.load_state_dict(blob["scheduler"])
    _set_rng_state(blob["rng"])
    with open(os.path.join(path, "trainer_state.json")) as f:
        return json.load(f)


class StopFlag:
    """Ctrl-C / SIGTERM only set a flag: nothing is raised in the middle of an operation, so a signal cannot be
    swallowed (e.g. by a library's destructor). Feature encoding stops between clips; training saves a
    checkpoint at the next step boundary and then exits with 128 + the signal number (a scheduler must not
    take a stopped run for a finished one). A second signal to the same process ends it at once.

    NOTE: the handler writes only `own`, and check() writes only `signum` (the value all ranks agreed on): a
    signal handled while check() waits in its all-reduce must neither be overwritten (lost) nor make this rank
    stop alone (a hang); it counts at the next check. Under torchrun a rank may learn of the stop from another
    rank before any signal reaches it: the SIGTERM that torchrun then sends it, once the first rank has exited,
    is its first own signal and does not cut its exit short."""

    def __init__(self):
        self.own = 0     # the first signal this process got (the handler's)
        self.signum = 0  # the signal all ranks agreed to stop on (check's)
        self.received = 0
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        self.received += 1
        if self.received > 1:  # a second signal: stop now (a partial checkpoint is cleaned up by the next run)
            print(f"{signal.Signals(signum).name} again: stopping at once", file=sys.stderr, flush=True)
            os._exit(128 + signum)
        self.own = signum

    @property
    def raised(self) -> bool:
        """Whether this process should stop (its own signal, or one that all ranks agreed on)."""
        return bool(self.own or self.signum)

    def check(self, device) -> bool:
        """True on every rank once any rank was signalled (so all ranks stop at the same step)."""
        agreed = int(all_reduce_max(float(self.own), device))
        self.signum = self.signum or agreed
        return self.signum > 0

    def exit(self, message: str = ""):
        """After saving: exit with 128 + the signal number, if a signal stopped the run."""
        if self.raised:
            if message:
                print(message, file=sys.stderr, flush=True)
            sys.exit(128 + (self.signum or self.own))


# ----------------------------------------------------------------------------------------------------------
# Cached encoder features


FEATURES_VERSION = 2  # bump when the media preprocessing code changes what features come out


def feature_key(model, dataset) -> str:
    """A hash of everything the frozen features depend on: the encoders (their weights and configs, whatever
    their origin: hub name, local folder, checkpoint or random init; their dtype and the device type), the
    frame and audio preprocessing settings, and every media file (path, size and mtime_ns), so that data
    regenerated or repaired in the same folder is encoded again."""
    h = hashlib.sha256()
    settings = {"version": FEATURES_VERSION, "n_frames": dataset.n_frames, "image_size": dataset.image_size,
                "audio_clips": dataset.audio_clips, "clip_seconds": dataset.clip_seconds,
                "use_faces": dataset.use_faces, "sample_rate": data.SAMPLE_RATE, "device": model.device.type,
                "vision_family": model.vision_family, "pixel_mean": model.pixel_mean.flatten().tolist(),
                "pixel_std": model.pixel_std.flatten().tolist()}
    h.update(json.dumps(settings, sort_keys=True).encode())
    for part in (model.vision, model.audio):
        h.update(part.config.to_json_string(use_diff=False).encode())
        for name, t in sorted(part.state_dict().items()):
            h.update(f"{name} {tuple(t.shape)} {t.dtype}".encode())
            h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    for clip in dataset.clips:
        for path in dataset.paths(clip.name):
            try:
                st = os.stat(path)
                identity = f"{st.st_size} {st.st_mtime_ns}"
            except OSError:
                identity = "missing"
            h.update(f"{clip.name} {os.path.abspath(path)} {identity}\n".encode())
    return h.hexdigest()[:20]


def _cached_skips(path: str) -> dict | None:
    """The clips a cache file left out (name -> reason), or None when the file is absent or unreadable."""
    try:
        with safe_open(path, "pt") as f:
            return json.loads((f.metadata() or {}).get("skipped", "{}"))
    except Exception:  # absent, or a partial file of a crashed run: encode again
        return None


def _remove_dead_temporaries(file: str):
    """Temporary copies of `file` (FILE.HOST.PID.tmp) that runs of this machine killed while writing left behind."""
    folder, base = os.path.split(file)
    host = socket.gethostname()
    for name in os.listdir(folder or "."):
        parts = name[len(base) + 1:].rsplit(".", 2) if name.startswith(base + ".") else []
        if len(parts) == 3 and parts[0] == host and parts[2] == "tmp" and parts[1].isdigit() \
                and not _alive(int(parts[1])):
            _remove(os.path.join(folder, name))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # it exists, and belongs to someone else
        return True
    return True


def cached_features(model, dataset, cache_dir: str, d: Dist, batch_size: int = 16, skip_bad: bool = False,
                    progress: bool = True, stop: StopFlag | None = None) -> dict:
    """Encoder features of every clip of `dataset`, computed once and kept in cache_dir.

    Each rank encodes its share of the clips and writes one safetensors file (the clips it skipped in its
    metadata); after a barrier every rank reads all of them (training draws any clip on any rank). A later run
    with the same key (feature_key) reads the files instead of decoding media again. Skipping is decided by
    each run: a cache that left clips out is not used by a run without skip_bad, which encodes again and fails
    on the bad clip as it would without a cache. With a StopFlag, a signal stops the encoding between clips and
    exits (128 + signal) before any training.
    """
    key = feature_key(model, dataset)
    ensure_writable(cache_dir)
    files = [os.path.join(cache_dir, f"features_{key}_{r}of{d.world}.safetensors") for r in range(d.world)]
    skips = _cached_skips(files[d.rank])
    if skips is None or (skips and not skip_bad):
        share = dataset.subset(dataset.clips[d.rank::d.world])
        try:
            with model.autocast():
                feats = data.encode_clips(share, model.encode_media, batch_size, skip_bad, progress and d.main,
                                          should_stop=(lambda: stop.raised) if stop else None)
        except KeyboardInterrupt:
            if stop is None or not stop.raised:
                raise
        if stop is not None and stop.raised:
            stop.exit(f"stopped by {signal.Signals(stop.own or stop.signum).name} while encoding features: "
                      "nothing was trained")
        tensors = {f"{name}|{k}": v.contiguous() for name, f in feats.items() for k, v in f.items()}
        # NOTE: a temporary name of this process: two runs that share the cache may write the same file at once
        tmp = f"{files[d.rank]}.{socket.gethostname()}.{os.getpid()}.tmp"
        with writing(files[d.rank], partial=(tmp,)):
            _remove_dead_temporaries(files[d.rank])
            save_file(tensors, tmp, metadata={"skipped": json.dumps(share.skipped)})
            _share_mode(tmp)
            os.replace(tmp, files[d.rank])
    barrier()
    feats = {}
    for file in files:
        for k, v in load_file(file).items():
            name, part = k.rsplit("|", 1)
            feats.setdefault(name, {})[part] = v
        dataset.skipped.update(_cached_skips(file) or {})
    dataset.clips = [c for c in dataset.clips if c.name in feats]
    return feats


def clip_features(model, root: str, clips: list, d: Dist, cache_dir: str, use_faces: bool = False,
                  skip_bad: bool = False, stop: StopFlag | None = None) -> tuple:
    """Encoder features (cached_features) of the clips under root at the model's frame and audio settings.
    Returns (name -> features, name -> why a clip was left out); a clip is usable when it has features."""
    cfg = model.cfg
    ds = data.ClipDataset(root, clips, cfg.n_frames, model.image_size, cfg.audio_clips, cfg.clip_seconds,
                          use_faces, skip_bad)
    return cached_features(model, ds, cache_dir, d, skip_bad=skip_bad, stop=stop), ds.skipped


def complete_sharded(model, clips, feats: dict, dist_env: Dist, n: int = 1, **kwargs) -> dict:
    """name -> n completions of each clip. The clips are split over the ranks and every rank gets all the
    results; kwargs go to model.complete (think, max_new_tokens, batch_size, greedy or sampling parameters)."""
    mine = clips[dist_env.rank::dist_env.world]
    texts = []
    if mine:  # a rank can be left without clips (fewer clips than ranks)
        media = data.stack_media(feats, [c.name for c in mine])  # (clips, ...): the n completions share them
        texts = model.complete([c.subtitle for c in mine], media, n=n, **kwargs)
    part = {c.name: texts[i * n:(i + 1) * n] for i, c in enumerate(mine)}
    if dist_env.world > 1:
        gathered = [None] * dist_env.world
        dist.all_gather_object(gathered, part)
        part = {k: v for g in gathered for k, v in g.items()}
    return part
