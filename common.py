"""common.py: distributed set-up, rank-0 logging, checkpoint and feature-cache plumbing shared by the stages.

One function reads RANK / LOCAL_RANK / WORLD_SIZE (`setup_dist`); without them the same code runs as one
process. nccl on GPU, gloo on CPU. Checkpoints are directories written atomically (a temporary name, then a
rename): `OUT/step_000120/` holds the model (model.save_model), `trainer_state.json` (step, data position,
arguments) and `optimizer.pt` (optimiser, scheduler and RNG states: tensors and plain Python only, loaded
with weights_only=True). `OUT/latest` names the newest step directory; `OUT/final/` is the last model.
"""

import dataclasses
import hashlib
import json
import os
import random
import shutil
import signal
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

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


def setup_dist(device: str | None = None) -> Dist:
    """Read the torchrun environment and start the process group (nccl on GPU, gloo on CPU)."""
    rank, local_rank, world = (int(os.environ.get(k, d)) for k, d in
                               (("RANK", 0), ("LOCAL_RANK", 0), ("WORLD_SIZE", 1)))
    use_cuda = torch.cuda.is_available() if device is None else device.startswith("cuda")
    if use_cuda:
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")
        if world > 1 and "OMP_NUM_THREADS" not in os.environ:
            # share the CPU cores between the ranks instead of each rank taking them all
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    if world > 1:
        dist.init_process_group("nccl" if use_cuda else "gloo", rank=rank, world_size=world)
    return Dist(rank, local_rank, world, dev)


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
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": step, "time": time.time(), **metrics}) + "\n")
        shown = "  ".join(f"{k.split('/', 1)[-1]} {_short(v)}" for k, v in metrics.items()
                          if isinstance(v, (int, float)))
        self.write(f"{prefix}step {step:>6}  {shown}")


def _short(v) -> str:
    if isinstance(v, int):
        return str(v)
    return f"{v:.4g}"


def parse_args(cls, argv=None):
    """Parse a dataclass of arguments with transformers.HfArgumentParser; unknown flags are an error."""
    from transformers import HfArgumentParser
    parser = HfArgumentParser(cls)
    args, rest = parser.parse_args_into_dataclasses(argv, return_remaining_strings=True)
    if rest:
        parser.error(f"unknown arguments: {' '.join(rest)}")
    return args


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
    """Atomically write OUT/name/ (model + trainer state) and point OUT/latest at it. Rank 0 only."""
    import model as model_lib
    final = os.path.join(out, name)
    tmp = os.path.join(out, f".tmp_{name}_{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model_lib.save_model(model, tmp)
    with open(os.path.join(tmp, "trainer_state.json"), "w") as f:
        json.dump(state or {}, f, indent=1, default=str)
    if optimizer is not None:
        torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict() if scheduler else None,
                    "rng": _rng_state()}, os.path.join(tmp, "optimizer.pt"))
    if os.path.exists(final):
        shutil.rmtree(final)
    os.replace(tmp, final)
    if name.startswith("step_"):
        with open(os.path.join(out, "latest.tmp"), "w") as f:
            f.write(name + "\n")
        os.replace(os.path.join(out, "latest.tmp"), os.path.join(out, "latest"))
        if keep_last:
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
    """Ctrl-C / SIGTERM set a flag; the loop saves a checkpoint at the next step boundary and exits."""

    def __init__(self):
        self.raised = False
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        if self.raised:  # a second signal: stop now
            sys.exit(128 + signum)
        self.raised = True

    def check(self, device) -> bool:
        """True on every rank once any rank was signalled (so all ranks stop at the same step)."""
        return all_reduce_max(float(self.raised), device) > 0


# ----------------------------------------------------------------------------------------------------------
# Cached encoder features


def feature_key(cfg, root: str, names, use_faces: bool) -> str:
    """What the frozen features depend on: encoders (and their seed when random), media settings, the clips."""
    fields = {k: v for k, v in dataclasses.asdict(cfg).items()
              if k in ("vision", "audio", "random_init", "seed", "n_frames", "audio_clips", "clip_seconds")}
    fields["arch"] = {k: cfg.arch.get(k) for k in ("vision", "audio")}
    blob = json.dumps([fields, os.path.abspath(root), sorted(names), use_faces], sort_keys=True, default=str)
    return hashlib.sha1(blob.encode()).hexdigest()[:16]


def cached_features(model, dataset, cache_dir: str, d: Dist, batch_size: int = 16, skip_bad: bool = False,
                    progress: bool = True) -> dict:
    """Encoder features of every clip of `dataset`, computed once and kept in cache_dir.

    Each rank encodes its share of the clips and writes one safetensors file; after a barrier every rank reads
    all of them (training draws any clip on any rank). A later run with the same encoders and clips reads the
    files instead of decoding media again.
    """
    from safetensors.torch import load_file, save_file
    import data
    key = feature_key(model.cfg, dataset.root, [c.name for c in dataset.clips], dataset.use_faces)
    os.makedirs(cache_dir, exist_ok=True)
    files = [os.path.join(cache_dir, f"features_{key}_{r}of{d.world}.safetensors") for r in range(d.world)]
    skipped_file = os.path.join(cache_dir, f"features_{key}_skipped_{d.rank}.json")
    if not os.path.isfile(files[d.rank]):
        share = dataset.subset(dataset.clips[d.rank::d.world])
        with model.autocast():
            feats = data.encode_clips(share, model.encode_media, batch_size, skip_bad, progress and d.main)
        tensors = {f"{name}|{k}": v.contiguous() for name, f in feats.items() for k, v in f.items()}
        save_file(tensors, files[d.rank] + ".tmp")
        os.replace(files[d.rank] + ".tmp", files[d.rank])
        with open(skipped_file, "w") as f:
            json.dump(share.skipped, f)
    barrier()
    feats = {}
    for file in files:
        for k, v in load_file(file).items():
            name, part = k.rsplit("|", 1)
            feats.setdefault(name, {})[part] = v
    for r in range(d.world):
        path = os.path.join(cache_dir, f"features_{key}_skipped_{r}.json")
        if os.path.isfile(path):
            dataset.skipped.update(json.load(open(path)))
    dataset.clips = [c for c in dataset.clips if c.name in feats]
    return feats


def complete_sharded(model, clips, feats: dict, d: Dist, n: int = 1, **kwargs) -> dict:
    """name -> n completions of each clip. The clips are split over the ranks and every rank gets all the
    results; kwargs go to model.complete (think, max_new_tokens, batch_size, greedy or sampling parameters)."""
    import data
    mine = clips[d.rank::d.world]
    texts = []
    if mine:  # a rank can be left without clips (fewer clips than ranks)
        media = {k: v.repeat_interleave(n, 0) for k, v in data.stack_media(feats, [c.name for c in mine]).items()}
        texts = model.complete([c.subtitle for c in mine for _ in range(n)], media, **kwargs)
    part = {c.name: texts[i * n:(i + 1) * n] for i, c in enumerate(mine)}
    if d.world > 1:
        gathered = [None] * d.world
        dist.all_gather_object(gathered, part)
        part = {k: v for g in gathered for k, v in g.items()}
    return part
