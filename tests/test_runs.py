"""Runs as a user meets them: every --help, output folders (used, --resume, --overwrite), unwritable and full
disks, permissions, signals and exit codes. sft.py and grpo.py share this plumbing (common.py)."""

import contextlib
import errno
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

import common
import data
import eval as eval_stage
import grpo
import model as M
import reward
import sft
import synth
from conftest import ROOT, run_script


# ---- --help of every script ------------------------------------------------------------------------------

def subcommands(main) -> list:
    """The subcommands an argparse main lists in its --help ({a,b,c})."""
    text = help_text(main, [])
    found = re.search(r"\{([\w,-]+)\}", text)
    return found.group(1).split(",") if found else []


def help_text(main, prefix) -> str:
    import contextlib
    import io
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf), pytest.raises(SystemExit) as e:
        main(prefix + ["--help"])
    assert e.value.code in (0, None), buf.getvalue()
    return buf.getvalue()


@pytest.mark.parametrize("script", ["synth", "sft", "grpo", "eval", "eval score", "eval plot", "data", "data *",
                                    "reward"])
def test_every_help_works(script):
    mains = {"synth": lambda argv: common.parse_args(synth.Args, argv),
             "sft": lambda argv: common.parse_args(sft.Args, argv),
             "grpo": lambda argv: common.parse_args(grpo.Args, argv),
             "eval": eval_stage.main, "data": data.main, "reward": reward.main}
    name, *sub = script.split()
    if sub == ["*"]:  # every subcommand data.py lists
        subs = subcommands(data.main)
        assert "check" in subs
        for s in subs:
            assert "usage" in help_text(data.main, [s])
        return
    text = help_text(mains[name], sub)
    assert "usage" in text and "--" in text
    if name in ("synth", "sft", "grpo"):  # every flag of the dataclass is documented
        for field in {"synth": synth.Args, "sft": sft.Args, "grpo": grpo.Args}[name].__dataclass_fields__:
            assert f"--{field}" in text


# ---- flags: checked before any work, one message per stage ------------------------------------------------

STAGES = {"sft": (sft.Args, sft.check_args), "grpo": (grpo.Args, grpo.check_args),
          "eval": (eval_stage.Args, eval_stage.check_args)}
NO_CUDA = "CUDA is not available here" + (" (this torch build has no CUDA)" if torch.version.cuda is None else
                                          " (no CUDA GPU is visible)")


@pytest.mark.parametrize("stage, argv, message", [
    ("sft", ["--lr", "-1"], "--lr -1.0: must be a positive number"),
    ("sft", ["--lr", "nan"], "--lr nan: must be a positive number"),
    ("sft", ["--max_new_tokens", "0"], "--max_new_tokens 0: must be at least 1"),
    ("sft", ["--batch_size", "0", "--warmup_steps", "-1"],
     "--batch_size 0: must be at least 1; --warmup_steps -1: must be at least 0"),
    ("grpo", ["--group_size", "0"], "--group_size 0: must be at least 2 (a group of one has no baseline)"),
    ("grpo", ["--lr", "0"], "--lr 0.0: must be a positive number"),
    ("grpo", ["--max_new_tokens", "0", "--beta", "-0.1"],
     "--max_new_tokens 0: must be at least 1; --beta -0.1: must be at least 0"),
    ("eval", ["--max_new_tokens", "0"], "--max_new_tokens 0: must be at least 1"),
    ("eval", ["--batch_size", "0", "--top_p", "1.5"],
     "--batch_size 0: must be at least 1; --top_p 1.5: must be at most 1"),
    ("eval", ["--temperature", "0"], "--temperature 0.0: must be a positive number"),
    ("sft", ["--device", "tpu"], "--device 'tpu': not a device; use cpu or cuda (cuda:N for one GPU)"),
    ("grpo", ["--device", "mps"], "--device mps: not supported; use cpu or cuda"),
    ("eval", ["--device", "cpu:1"], "--device cpu:1: use cpu (the CPU has no index)"),
])
def test_bad_flags_are_one_message_before_any_work(stage, argv, message):
    cls, check = STAGES[stage]
    with pytest.raises(SystemExit) as e:
        check(common.parse_args(cls, argv))
    assert str(e.value) == f"error: {message}"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a machine without CUDA")
@pytest.mark.parametrize("stage", list(STAGES))
def test_cuda_without_cuda_is_refused(stage):
    cls, check = STAGES[stage]
    for device in ("cuda", "cuda:1"):
        with pytest.raises(SystemExit) as e:
            check(common.parse_args(cls, ["--device", device]))
        assert str(e.value) == f"error: --device {device}: {NO_CUDA}; use --device cpu"


def test_a_cuda_device_must_exist(monkeypatch):
    """With 2 GPUs: cuda:1 is fine in one process; cuda:3 is not there; under torchrun each rank takes
    cuda:LOCAL_RANK, so an index is refused, and so is a local rank without its GPU."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert common.check_device("cuda:1") == [] and common.check_device("cuda") == []
    assert common.check_device("cuda:3") == ["--device cuda:3: this machine has 2 CUDA device(s), cuda:0 to cuda:1"]
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert common.check_device("cuda") == []
    assert common.check_device("cuda:1") == ["--device cuda:1: under torchrun each rank takes cuda:LOCAL_RANK; pass "
                                             "--device cuda"]
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert common.check_device("cuda") == ["--device cuda: this machine has 2 CUDA device(s), cuda:0 to cuda:1, and "
                                           "this is local rank 3"]


def test_what_a_user_sees_for_bad_flags_and_a_damaged_checkpoint(synth_data, tmp_path):
    """As run from a shell: one line on stderr, exit code 1, no traceback, nothing written."""
    ckpt = tmp_path / "ckpt"
    M.save_model(M.build_model(M.ModelConfig.from_preset("tiny"), device="cpu"), str(ckpt))
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["arch"]["llm"]["num_hidden_layers"] = 2  # arch now disagrees with components (3 layers trained)
    (ckpt / "config.json").write_text(json.dumps(cfg))
    runs = {
        "sft.py": (["--lr", "-1", "--max_new_tokens", "0", "--device", "tpu", "--out", tmp_path / "o"],
                   "error: --max_new_tokens 0: must be at least 1; --lr -1.0: must be a positive number; "
                   "--device 'tpu': not a device; use cpu or cuda (cuda:N for one GPU)"),
        "eval.py": (["--ckpt", ckpt, "--data", synth_data, "--out", tmp_path / "e"],
                    f"error: {ckpt}/config.json: the llm was trained as "),
    }
    for script, (argv, message) in runs.items():
        r = subprocess.run([sys.executable, str(ROOT / script), *map(str, argv)], capture_output=True, text=True,
                           cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
        assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr[-3000:]
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(message), r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no --out folder made


# ---- output folders ---------------------------------------------------------------------------------------

def fake_run(out, args, step=2):
    """A run folder as sft.py leaves it, without the weights: args.json, metrics, a step checkpoint, latest."""
    ckpt = out / f"step_{step:06d}"
    ckpt.mkdir(parents=True)
    (ckpt / "config.json").write_text("{}")
    (ckpt / "trainer_state.json").write_text(json.dumps({"step": step, "args": common.asdict(args)}))
    (out / "latest").write_text(ckpt.name + "\n")
    (out / "args.json").write_text(json.dumps(common.asdict(args)))
    (out / "metrics.jsonl").write_text('{"step": 1}\n')
    return out


def test_used_out_is_refused_and_a_failed_run_writes_nothing(tmp_path):
    out = tmp_path / "run"
    fake_run(out, sft.Args(out=str(out)))
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    with pytest.raises(SystemExit, match=r"holds a run already \(args.json, latest, metrics.jsonl, step_000002\): "
                                         r"continue it with --resume, replace it with --overwrite"):
        sft.main(sft.Args(out=str(out), data=str(tmp_path / "data")))
    # --overwrite with a typo in --data: refused before anything of the old run is touched
    with pytest.raises(SystemExit, match="no such folder"):
        sft.main(sft.Args(out=str(out), data=str(tmp_path / "typo"), overwrite=True))
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before
    fresh = tmp_path / "new" / "fresh"  # a refused run leaves no folder behind either, not even an empty one
    with pytest.raises(SystemExit, match="no such folder"):
        sft.main(sft.Args(out=str(fresh), data=str(tmp_path / "typo")))
    assert not (tmp_path / "new").exists()


def test_resume_refuses_changes_that_alter_the_run(tmp_path):
    out = tmp_path / "run"
    fake_run(out, sft.Args(out=str(out), lr=1e-3, max_steps=150))
    with pytest.raises(SystemExit, match=r"--resume would change what the run computes: --data None -> elsewhere, "
                                         r"--lr 0.001 -> 0.002, --max_steps 150 -> 500 \("):
        common.check_out(sft.Args(out=str(out), lr=2e-3, max_steps=500, data="elsewhere", resume=True))
    with pytest.raises(SystemExit, match="choose one"):
        common.check_out(sft.Args(out=str(out), resume=True, overwrite=True))
    said = []  # safe changes pass, and are said
    got = common.check_out(sft.Args(out=str(out), lr=1e-3, max_steps=150, resume=True, log_every=5, device="cpu",
                                    stop_after=3), say=said.append)
    assert got == str(out / "step_000002")
    assert said == ["resuming with changed flags that do not alter the run: --log_every 10 -> 5, "
                    "--stop_after 0 -> 3, --device None -> cpu"]
    # GRPO's constant schedule lets a run grow: a larger --max_steps passes, a smaller one does not
    g = tmp_path / "grpo"
    fake_run(g, grpo.Args(out=str(g), max_steps=60))
    said.clear()
    common.check_out(grpo.Args(out=str(g), max_steps=100, resume=True), say=said.append, grow=("max_steps",))
    assert said == ["resuming with changed flags that do not alter the run: --max_steps 60 -> 100"]
    with pytest.raises(SystemExit, match="--max_steps 60 -> 40"):
        common.check_out(grpo.Args(out=str(g), max_steps=40, resume=True), grow=("max_steps",))


def test_overwrite_deletes_the_old_run_and_nothing_else(tmp_path):
    out = tmp_path / "run"
    fake_run(out, sft.Args(out=str(out)))
    (out / ".tmp_step_000004_123").mkdir()  # a partial write of a crashed run
    (out / "features").mkdir()  # a feature cache kept in the run folder, and a file of the user's
    (out / "notes.txt").write_text("mine")
    args = sft.Args(out=str(out), overwrite=True, max_steps=7)
    assert common.check_out(args) is None
    assert not (out / ".tmp_step_000004_123").exists()  # orphans go at the start; the old run stays until...
    assert (out / "step_000002").exists()
    common.start_run(args, main=True)  # ...the new run passed its checks
    assert sorted(p.name for p in out.iterdir()) == ["args.json", "features", "notes.txt"]
    assert json.loads((out / "args.json").read_text())["max_steps"] == 7


@pytest.mark.parametrize("where", ["below a file", "/sys"])
def test_unwritable_out_fails_before_the_work(tmp_path, where):
    if where == "/sys":
        if not os.path.isdir("/sys") or os.access("/sys", os.W_OK) and _can_write("/sys"):
            pytest.skip("needs a folder that even root cannot write (/sys on Linux)")
        out = "/sys/affectrl_out"
    else:
        (tmp_path / "file").write_text("x")
        out = str(tmp_path / "file" / "out")
    with pytest.raises(SystemExit, match=f"error: cannot write {out}: "):
        sft.main(sft.Args(out=out, data=str(tmp_path / "never_read")))


def _can_write(folder):
    try:
        os.makedirs(os.path.join(folder, "affectrl_probe"))
    except OSError:
        return False
    os.rmdir(os.path.join(folder, "affectrl_probe"))
    return True


def test_resume_drops_metrics_logged_after_the_checkpoint(tmp_path):
    out = tmp_path / "run"
    fake_run(out, sft.Args(out=str(out)))  # checkpoint at step 2; a kill -9 after step 4 was logged
    lines = [json.dumps({"step": s, "train/loss": 1.0 + s}) + "\n" for s in (0, 1, 2, 2, 3, 4)]
    (out / "metrics.jsonl").write_text("".join(lines) + '{"step": 5, "train/lo')
    common.start_run(sft.Args(out=str(out), resume=True), main=True, resumed_at=2)
    assert (out / "metrics.jsonl").read_text() == "".join(lines[:4])


# ---- checkpoints: full disk, orphans, permissions ---------------------------------------------------------

@pytest.fixture(scope="module")
def tiny():
    return M.build_model(M.ModelConfig.from_preset("tiny"), device="cpu")


def optimizer_with_state(model):
    """AdamW holding its moment estimates (as after a step), the model's weights unchanged (lr 0)."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.0)
    for group in opt.param_groups:
        for p in group["params"]:
            p.grad = torch.zeros_like(p)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return opt


TORCH_FULL = "[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534"  # torch.save on a full tmpfs


@pytest.mark.parametrize("library, raised, full, why", [
    ("torch.save", OSError(errno.ENOSPC, "No space left on device"), False, "the disk is full"),
    ("torch.save", RuntimeError(TORCH_FULL), True, "the disk is full"),  # no errno: the file system is full
    ("torch.save", RuntimeError(TORCH_FULL), False, f"RuntimeError: {TORCH_FULL}"),  # ...and never claimed if not
    ("save_file", SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)"),
     False, "the disk is full"),
    ("save_file", SafetensorError("Error while serializing: I/O error: Permission denied (os error 13)"), True,
     "permission denied"),
])
def test_a_failed_checkpoint_write_is_one_message_and_leaves_nothing(tiny, tmp_path, monkeypatch, library, raised,
                                                                     full, why):
    """Whatever the library raises (each library's own exception type), the message names the path and the cause,
    the partial folder is removed (it could keep the disk full) and `latest` names the last complete checkpoint."""
    common.save_checkpoint(str(tmp_path), "step_000001", tiny, state={"step": 1})

    def half_written(obj, path, *a, **k):
        with open(path, "wb") as f:
            f.write(b"x" * 1000)
        raise raised

    monkeypatch.setattr(*((torch, "save") if library == "torch.save" else (M, "save_file")), half_written)
    monkeypatch.setattr(common, "disk_is_full", lambda path: full)
    with pytest.raises(SystemExit) as e:
        common.save_checkpoint(str(tmp_path), "step_000002", tiny, optimizer_with_state(tiny), state={"step": 2})
    assert str(e.value) == f"error: cannot write {tmp_path}/step_000002: {why}"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step_000001"]  # no .tmp_* keeps it full
    assert common.latest_checkpoint(str(tmp_path)) == str(tmp_path / "step_000001")


@pytest.fixture
def small_disk(tmp_path):
    """mount(size) -> a folder on a tmpfs of that size, unmounted afterwards; skipped where the test may not mount
    (not root, or no CAP_SYS_ADMIN in a container)."""
    mounted = []

    def mount(size: str) -> Path:
        where = tmp_path / f"disk{len(mounted)}"
        where.mkdir()
        try:
            r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
                               capture_output=True, text=True, timeout=60)
        except (OSError, subprocess.SubprocessError) as e:
            pytest.skip(f"needs a small tmpfs, and mount failed: {e}")
        if r.returncode:
            pytest.skip(f"needs a small tmpfs (mount as root): {(r.stderr or r.stdout).strip()}")
        mounted.append(where)
        return where

    yield mount
    for where in mounted:  # a file still open there (a failed test) would keep it busy: then detach it lazily
        if subprocess.run(["umount", str(where)], capture_output=True, timeout=60).returncode:
            subprocess.run(["umount", "-l", str(where)], capture_output=True, timeout=60)


def fill(path: Path):
    """Write to `path` until its file system is full (ENOSPC), to the last page."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    try:
        for chunk in (1 << 20, 1 << 12):
            with contextlib.suppress(OSError):
                while True:
                    os.write(fd, b"x" * chunk)
    finally:
        os.close(fd)


@pytest.mark.parametrize("size, library", [("4m", SafetensorError), ("8m", RuntimeError)])
def test_a_real_full_disk_loses_only_the_checkpoint_being_written(tiny, small_disk, size, library):
    """On a real full file system (a tmpfs): with 4 MB the model's trainable.safetensors no longer fits
    (safetensors raises), with 8 MB the optimizer state does (torch.save raises a RuntimeError without errno).
    Either way: one message saying the disk is full, no partial folder, `latest` intact."""
    disk = small_disk(size)
    common.save_checkpoint(str(disk), "step_000001", tiny, state={"step": 1})  # the model alone: 2.7 MB fits
    free = os.statvfs(disk).f_bfree
    with pytest.raises(SystemExit) as e:
        common.save_checkpoint(str(disk), "step_000002", tiny, optimizer_with_state(tiny), state={"step": 2})
    assert str(e.value) == f"error: cannot write {disk}/step_000002: the disk is full"
    assert type(e.value.__context__) is library, repr(e.value.__context__)  # the library this size makes fail
    assert sorted(os.listdir(disk)) == ["latest", "step_000001"]
    assert common.latest_checkpoint(str(disk)) == str(disk / "step_000001")
    assert os.statvfs(disk).f_bfree == free  # the partial files are gone and closed: their space is free again


def test_the_next_start_removes_leftovers_that_fill_the_disk(small_disk):
    """A run killed while writing leaves a .tmp_* folder (here filling the disk) and maybe a write probe: the next
    start removes them before it checks that the folder can be written, and leaves no probe of its own. A log
    write that fails leaves metrics.jsonl as it was (no half line)."""
    out = small_disk("2m") / "run"
    fake_run(out, sft.Args(out=str(out)))
    line = json.dumps({"step": 1, "pad": ""})
    # a whole page, so that an append needs a new one
    (out / "metrics.jsonl").write_text(line[:-2] + "x" * (4095 - len(line)) + '"}\n')
    before = (out / "metrics.jsonl").read_text()
    (out / ".write_test_99999999").write_text("ok\n")
    (out / ".tmp_step_000004_99999999").mkdir()
    fill(out / ".tmp_step_000004_99999999" / "optimizer.pt")
    assert common.disk_is_full(str(out))
    with pytest.raises(SystemExit, match=f"error: cannot write {out}/metrics.jsonl: the disk is full"):
        common.Logger(str(out), True, write=lambda s: None).log(2, {"train/loss": 1.0})
    assert (out / "metrics.jsonl").read_text() == before
    assert common.check_out(sft.Args(out=str(out), overwrite=True)) is None
    assert sorted(p.name for p in out.iterdir()) == ["args.json", "latest", "metrics.jsonl", "step_000002"]
    assert not common.disk_is_full(str(out))


def test_a_full_disk_is_one_message_for_the_user(synth_data, small_disk, tmp_path):
    """sft.py with --out on a 4 MB disk, as a user runs it: its final checkpoint's optimizer state does not fit
    (torch.save's RuntimeError); the user sees one line, not a traceback, and the disk holds no partial files."""
    disk = small_disk("4m")
    r = subprocess.run([sys.executable, str(ROOT / "sft.py"), "--data", str(synth_data), "--out", str(disk),
                        "--feature_cache", str(tmp_path / "f"), *SFT[:-2], "--max_steps", "2"],
                       capture_output=True, text=True, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"},
                       timeout=600)
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert r.stderr.strip().splitlines()[-1] == f"error: cannot write {disk}/step_000002: the disk is full"
    assert sorted(os.listdir(disk)) == ["args.json", "metrics.jsonl"]


KILLED_DURING_SAVE = """
import os, runpy, signal, sys, torch
calls = []
def save_then_die(obj, path, *a, **k):  # the 1st checkpoint is written; kill -9 halfway through the 2nd
    calls.append(path)
    if len(calls) == 2:
        open(path, "wb").write(b"x" * 1000)
        os.kill(os.getpid(), signal.SIGKILL)
    return real_save(obj, path, *a, **k)
real_save, torch.save = torch.save, save_then_die
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def test_kill_9_during_a_checkpoint_write_loses_only_that_checkpoint(synth_data, tmp_path):
    """SIGKILL runs no cleanup: the partial .tmp_* folder stays, `latest` still names the complete checkpoint
    before it, and --resume removes the partial folder and continues from there (bit-exact: the SIGTERM test)."""
    out, feats = tmp_path / "o", ["--feature_cache", tmp_path / "f"]
    flags = [*SFT, "--save_every", 2, "--max_steps", 6]
    r = subprocess.run([sys.executable, "-c", KILLED_DURING_SAVE, str(ROOT / "sft.py"), "--data", str(synth_data),
                        "--out", str(out), *map(str, feats + flags)], capture_output=True, text=True, cwd=ROOT,
                       env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    assert r.returncode == -signal.SIGKILL, r.stderr[-3000:]
    assert [p.name.rsplit("_", 1)[0] for p in out.glob(".tmp_*")] == [".tmp_step_000004"]  # name_pid
    assert common.latest_checkpoint(str(out)) == str(out / "step_000002")
    r = run_script("sft.py", "--data", synth_data, "--out", out, *feats, *flags, "--resume", "--stop_after", 1)
    assert f"resumed from {out / 'step_000002'} at step 2" in r.stdout + r.stderr
    assert not list(out.glob(".tmp_*")) and common.latest_checkpoint(str(out)) == str(out / "step_000003")


def test_a_failed_log_write_is_one_message(tmp_path, monkeypatch):
    logger = common.Logger(str(tmp_path), True, write=lambda s: None)
    real_open = open

    def full(path, *a, **k):
        if str(path).endswith("metrics.jsonl"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_open(path, *a, **k)

    monkeypatch.setattr("builtins.open", full)
    with pytest.raises(SystemExit, match=f"error: cannot write {tmp_path}/metrics.jsonl: the disk is full"):
        logger.log(1, {"train/loss": 1.0})


def test_checkpoint_files_have_the_mode_of_other_files(tiny, tmp_path):
    common.save_checkpoint(str(tmp_path), "final", tiny, state={"step": 1})
    common.Logger(str(tmp_path), True, write=lambda s: None).log(1, {"train/loss": 1.0})
    want = os.stat(tmp_path / "metrics.jsonl").st_mode & 0o777
    modes = {str(p.relative_to(tmp_path / "final")): p.stat().st_mode & 0o777 for p in (tmp_path / "final").rglob("*")
             if p.is_file()}
    assert "trainable.safetensors" in modes and set(modes.values()) == {want}, modes


# ---- signals and exit codes --------------------------------------------------------------------------------

def start(script, *args, log):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, str(ROOT / script), *map(str, args)], cwd=ROOT, env=env,
                            stdout=log.open("w"), stderr=subprocess.STDOUT)


def wait_for(proc, log, pattern, timeout=300):
    t0 = time.time()
    while not re.search(pattern, log.read_text()):
        assert proc.poll() is None, log.read_text()[-3000:]
        assert time.time() - t0 < timeout, log.read_text()[-3000:]
        time.sleep(0.02)


SFT = ["--val_size", "8", "--batch_size", "8", "--micro_batch", "8", "--eval_every", "0", "--eval_samples", "2",
       "--save_every", "0", "--keep_last", "5", "--log_every", "1", "--max_steps", "200"]


WAITING_IN_ENCODING = """
import runpy, signal, sys, time
import data
calls, real_load_audio = [], data.load_audio
def load_audio_then_wait(*a, **k):  # the 2nd clip waits for the test's signal: no race with the encoding's end
    calls.append(1)
    if len(calls) == 2:
        print("waiting in the encoding", flush=True)
        stop, deadline = signal.getsignal(signal.SIGINT).__self__, time.monotonic() + 600
        while not stop.raised and time.monotonic() < deadline:
            time.sleep(0.01)
    return real_load_audio(*a, **k)
data.load_audio = load_audio_then_wait
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def test_ctrl_c_during_feature_encoding_stops_the_run(synth_data, tmp_path):
    """The signal arrives while a clip is being decoded (the run waits there for it: a signal sent after a fixed
    time could find the encoding finished on a fast machine or not begun on a loaded one)."""
    log = tmp_path / "log"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-c", WAITING_IN_ENCODING, str(ROOT / "sft.py"), "--data", str(synth_data),
                             "--out", str(tmp_path / "o"), "--feature_cache", str(tmp_path / "f"), *SFT], cwd=ROOT,
                            env=env, stdout=log.open("w"), stderr=subprocess.STDOUT)
    wait_for(proc, log, "waiting in the encoding")
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=300) == 128 + signal.SIGINT, log.read_text()[-3000:]
    assert "stopped by SIGINT while encoding features: nothing was trained" in log.read_text()
    assert not (tmp_path / "o" / "latest").exists() and not (tmp_path / "o" / "metrics.jsonl").exists()


@pytest.fixture
def stop_flag(monkeypatch):
    """A StopFlag in this process (its handlers removed afterwards), with os._exit recorded instead of done."""
    exits = []
    monkeypatch.setattr(os, "_exit", lambda code: exits.append(code))
    handlers = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    try:
        yield common.StopFlag(), exits
    finally:
        signal.signal(signal.SIGINT, handlers[0])
        signal.signal(signal.SIGTERM, handlers[1])


def test_a_signal_during_the_stop_check_is_not_lost(stop_flag, monkeypatch):
    """A signal handled while check() waits in its all-reduce (where ranks spend their waits) was overwritten by
    the all-reduced 0: the run went on as if never signalled. Now it counts at the next step, on every rank."""
    flag, exits = stop_flag

    def all_reduce_then_signal(value, device):  # this rank contributed 0; then SIGTERM is handled
        flag._handle(signal.SIGTERM, None)
        return value
    monkeypatch.setattr(common, "all_reduce_max", all_reduce_then_signal)
    assert flag.check("cpu") is False  # the other ranks saw 0 too: nobody stops alone (no hang)
    monkeypatch.setattr(common, "all_reduce_max", lambda value, device: value)
    assert flag.check("cpu") is True and exits == []
    with pytest.raises(SystemExit) as e:
        flag.exit()
    assert e.value.code == 128 + signal.SIGTERM


def test_a_rank_told_to_stop_by_another_takes_its_own_first_signal_calmly(stop_flag, monkeypatch):
    """Under torchrun, rank 1 is signalled; rank 0 learns it from the all-reduce and saves; when rank 1 exits,
    torchrun sends rank 0 a SIGTERM: its first own signal, which must not end it before it has said it stopped
    (it did so with os._exit, a race the torchrun test lost now and then). A second own signal still does."""
    flag, exits = stop_flag
    monkeypatch.setattr(common, "all_reduce_max", lambda value, device: float(signal.SIGTERM))  # another rank's
    assert flag.check("cpu") is True
    flag._handle(signal.SIGTERM, None)
    assert exits == []
    flag._handle(signal.SIGINT, None)
    assert exits == [128 + signal.SIGINT]


def workers(launcher: subprocess.Popen) -> dict:
    """torchrun's workers, RANK -> pid (Linux: read from /proc)."""
    found = {}
    with contextlib.suppress(OSError):
        for child in (Path("/proc") / str(launcher.pid) / "task" / str(launcher.pid) / "children").read_text().split():
            env = (Path("/proc") / child / "environ").read_bytes().split(b"\0")
            rank = next((v[5:] for v in env if v.startswith(b"RANK=")), None)
            found[int(rank)] = int(child)
    return found


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="finds the workers in /proc")
@pytest.mark.parametrize("target", ["torchrun", "rank 1"])
def test_sigterm_under_torchrun_stops_both_ranks_at_one_step_with_a_checkpoint(synth_data, tmp_path, target):
    """A scheduler signals torchrun, which passes SIGTERM to each worker (and kills them 30 s later, unless
    --shutdown_timeout says otherwise); or one worker alone is signalled. Either way both ranks stop at the same
    step, rank 0 saves it once, and nobody hangs."""
    log, out = tmp_path / "log", tmp_path / "o"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             str(ROOT / "sft.py"), "--data", str(synth_data), "--out", str(out), "--feature_cache",
                             str(tmp_path / "f"), *SFT], cwd=ROOT, env=env, stdout=log.open("w"),
                            stderr=subprocess.STDOUT)
    wait_for(proc, log, r"step +2 ")
    ranks = workers(proc)
    try:
        os.kill(proc.pid if target == "torchrun" else ranks[1], signal.SIGTERM)
        proc.wait(timeout=120)  # torchrun's own exit code (1) and traceback: the workers' part is what we check
    finally:  # a hung run must not outlive the test (each worker runs in a session of its own)
        for pid in [*ranks.values(), proc.pid]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    said = log.read_text()
    k = int((out / "latest").read_text().strip()[5:])
    assert said.count(f"stopped at step {k} of 200") == 1, said[-3000:]  # printed by rank 0, once
    assert "SIGKILL" not in said, said[-3000:]  # the workers exited by themselves
    state = json.loads((out / f"step_{k:06d}" / "trainer_state.json").read_text())
    assert state["step"] == k and not (out / "final").exists()
    assert not list(out.glob(".tmp_*")) and sorted(p.name for p in out.glob("step_*")) == [f"step_{k:06d}"]


def test_sigterm_saves_exits_143_and_resume_is_exact(synth_data, tmp_path):
    feats = ["--feature_cache", tmp_path / "f"]
    log = tmp_path / "log"
    proc = start("sft.py", "--data", synth_data, "--out", tmp_path / "split", *feats, *SFT, log=log)
    wait_for(proc, log, r"step +2 ")
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=300) == 128 + signal.SIGTERM, log.read_text()[-3000:]
    k = int((tmp_path / "split" / "latest").read_text().strip()[5:])
    assert f"stopped at step {k} of 200" in log.read_text() and not (tmp_path / "split" / "final").exists()
    # resume for one more step, with safe changes; --stop_after ends with 0
    r = run_script("sft.py", "--data", synth_data, "--out", tmp_path / "split", *feats, *SFT, "--resume",
                   "--stop_after", 1, "--log_every", 2)
    said = r.stdout + r.stderr
    assert f"resumed from {tmp_path / 'split' / f'step_{k:06d}'} at step {k}" in said
    assert "changed flags that do not alter the run: --log_every 1 -> 2, --stop_after 0 -> 1" in said
    run_script("sft.py", "--data", synth_data, "--out", tmp_path / "straight", *feats, *SFT, "--stop_after", k + 1)
    a = load_file(tmp_path / "split" / f"step_{k + 1:06d}" / "trainable.safetensors")
    b = load_file(tmp_path / "straight" / f"step_{k + 1:06d}" / "trainable.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)
