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
    fresh = tmp_path / "fresh"
    with pytest.raises(SystemExit, match="no such folder"):
        sft.main(sft.Args(out=str(fresh), data=str(tmp_path / "typo")))
    assert not (fresh / "args.json").exists()


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


def test_full_disk_leaves_no_partial_checkpoint(tiny, tmp_path, monkeypatch):
    opt = torch.optim.AdamW([p for p in tiny.parameters() if p.requires_grad])
    common.save_checkpoint(str(tmp_path), "step_000001", tiny, opt, state={"step": 1})

    def disk_full(obj, path):
        with open(path, "wb") as f:  # half a file, then the disk is full
            f.write(b"x" * 1000)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(SystemExit, match=f"error: cannot write {tmp_path}/step_000002: the disk is full"):
        common.save_checkpoint(str(tmp_path), "step_000002", tiny, opt, state={"step": 2})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step_000001"]  # no .tmp_* keeps it full
    assert common.latest_checkpoint(str(tmp_path)) == str(tmp_path / "step_000001")


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


def test_ctrl_c_during_feature_encoding_stops_the_run(synth_data, tmp_path):
    log = tmp_path / "log"
    proc = start("sft.py", "--data", synth_data, "--out", tmp_path / "o", "--feature_cache", tmp_path / "f", *SFT,
                 log=log)
    wait_for(proc, log, "encode media")
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=300) == 128 + signal.SIGINT, log.read_text()[-3000:]
    assert "stopped by SIGINT while encoding features: nothing was trained" in log.read_text()
    assert not (tmp_path / "o" / "latest").exists() and not (tmp_path / "o" / "metrics.jsonl").exists()


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
