"""A disk that fills up for real: a small tmpfs mounted in a private mount namespace (``unshare
--user --map-root-user --mount``, no privileges needed where user namespaces are allowed) holds the
checkpoints or the ODE pairs, with a ballast file leaving room for only part of the run. The write
that does not fit fails with the kernel's own ENOSPC; what was written before stays readable (its
checksums verified by the next run); nothing half-written is left; after space is freed the next
run resumes and ends with the bytes of a run that never ran out of space."""

from __future__ import annotations

import hashlib
import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import ROOT, dmdx_env, dmdx_fit

pytestmark = [pytest.mark.chaos, pytest.mark.slow]

MIB = 2**20


def _can_mount_a_small_filesystem() -> str | None:
    """Why a private tmpfs cannot be mounted here (``None``: it can)."""
    try:
        probe = subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "sh", "-c",
                                "d=$(mktemp -d) && mount -t tmpfs -o size=1m tmpfs \"$d\" && umount \"$d\""],
                               capture_output=True, text=True, timeout=30)
    except FileNotFoundError:
        return "no `unshare` (util-linux) on this machine"
    return None if probe.returncode == 0 else f"unshare cannot mount a tmpfs here: {probe.stderr.strip()}"


@pytest.fixture(scope="module")
def small_filesystem():
    reason = _can_mount_a_small_filesystem()
    if reason:
        pytest.skip(reason)


def on_a_small_disk(mount: Path, size: int, ballast: int, *steps: list[str], timeout: float = 400) -> list[dict]:
    """Run each command of ``steps`` in one private mount namespace where ``mount`` is a tmpfs of
    ``size`` bytes, ``ballast`` of them taken by ``mount/ballast`` until a step ``["free"]`` removes
    it. Returns each command's exit code, stdout and stderr (the files on the tmpfs vanish with the
    namespace: the commands copy out what the test reads)."""
    out = mount.parent / f"{mount.name}_steps"
    out.mkdir(parents=True)
    mount.mkdir(parents=True)
    lines = ["set -u", f"mount -t tmpfs -o size={size} tmpfs {shlex.quote(str(mount))}",
             f"head -c {ballast} /dev/zero > {shlex.quote(str(mount / 'ballast'))}"]
    for i, step in enumerate(steps):
        if step == ["free"]:
            lines.append(f"rm {shlex.quote(str(mount / 'ballast'))}")
            continue
        files = f"{out}/{i}"
        lines.append(f"{shlex.join(step)} > {files}.out 2> {files}.err; echo $? > {files}.rc")
    lines.append(f"cp -a {shlex.quote(str(mount))} {shlex.quote(str(mount.parent / (mount.name + '_copy')))}")
    done = subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "bash", "-c", "\n".join(lines)],
                          cwd=ROOT, env=dmdx_env(), capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stderr
    return [{"rc": int((out / f"{i}.rc").read_text()), "stdout": (out / f"{i}.out").read_text(),
             "stderr": (out / f"{i}.err").read_text()} for i, step in enumerate(steps) if step != ["free"]]


def dmdx(*args: str) -> list[str]:
    return [sys.executable, "-m", "dmdx_lightning.cli", *args]


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


CHECKPOINTED = ["--config", "tests/configs/adm_tiny.yaml", "--trainer.plugins+=dmdx_lightning.checkpoint_io.AtomicCheckpointIO",
                "--trainer.callbacks+=lightning.pytorch.callbacks.ModelCheckpoint",
                "--trainer.callbacks.every_n_train_steps=1", "--trainer.callbacks.save_top_k=-1",
                "--trainer.callbacks.filename={step}"]


def test_full_disk_during_a_checkpoint_save_keeps_the_last_good_one_and_the_run_resumes(tmp_path, small_filesystem):
    reference = tmp_path / "reference"
    ok = dmdx_fit(*CHECKPOINTED, "--trainer.default_root_dir", str(reference), "--trainer.max_steps", "4",
                  f"--trainer.callbacks.dirpath={reference / 'ckpt'}", "--trainer.callbacks+=tests.helpers.RankReport",
                  f"--trainer.callbacks.dir={reference / 'report'}")
    assert ok.returncode == 0, ok.stderr[-3000:]
    size = (reference / "ckpt" / "step=1.ckpt").stat().st_size
    disk = tmp_path / "disk"
    ckpt = disk / "ckpt"

    def fit(name, steps, *args):
        return dmdx("fit", *CHECKPOINTED, "--trainer.default_root_dir", str(tmp_path / name), "--trainer.max_steps",
                    str(steps), f"--trainer.callbacks.dirpath={ckpt}", "--trainer.callbacks+=tests.helpers.RankReport",
                    f"--trainer.callbacks.dir={tmp_path / name / 'report'}", *args)

    # room for two checkpoints and a half: the third save hits the end of the disk
    full, resumed = on_a_small_disk(disk, 64 * MIB, 64 * MIB - int(2.5 * size), fit("full", 4), ["free"],
                                    fit("resumed", 4, "--ckpt_path", str(ckpt / "step=2.ckpt")))
    assert full["rc"] != 0
    assert "No space left on device" in full["stderr"] and "step=3.ckpt" in full["stderr"], full["stderr"][-3000:]
    left = sorted(p.name for p in (tmp_path / "disk_copy" / "ckpt").iterdir())
    # the full run's step=1 and step=2 survive whole; its step=3 was never left half-written (the
    # resumed run wrote steps 3 and 4 after space was freed)
    assert left == [".checksums.json", "step=1.ckpt", "step=2.ckpt", "step=3.ckpt", "step=4.ckpt"], left
    assert resumed["rc"] == 0, resumed["stderr"][-3000:]  # the resume verified step=2's checksum
    report = json.loads((tmp_path / "resumed" / "report" / "rank0.json").read_text())
    assert report["fingerprint"] == json.loads((reference / "report" / "rank0.json").read_text())["fingerprint"]


def test_full_disk_while_writing_ode_pairs_keeps_the_finished_shards_and_the_rerun_completes(tmp_path,
                                                                                               small_filesystem):
    reference = tmp_path / "reference"
    # the quickstart's pairs, fewer of them: 5 shards of 48
    config = ["predict", "--config", "configs/quickstart/ode_pairs.yaml", "--data.init_args.num_pairs", "240",
              "--data.init_args.shard_size", "48", "--data.init_args.batch_size", "48"]
    ok = subprocess.run(dmdx(*config, "--trainer.default_root_dir", str(reference)), cwd=ROOT, env=dmdx_env(),
                        capture_output=True, text=True, timeout=300)
    assert ok.returncode == 0, ok.stderr[-3000:]
    shard = (reference / "shard-00000.safetensors").stat().st_size
    pairs = tmp_path / "disk" / "pairs"
    write = dmdx(*config, "--trainer.default_root_dir", str(pairs))
    # room for two shards and a half (and the small JSON files)
    full, again = on_a_small_disk(tmp_path / "disk", 4 * MIB, 4 * MIB - int(2.5 * shard) - 64 * 1024, write,
                                  ["free"], write)
    assert full["rc"] != 0
    assert f"No space left on device: '{pairs}/shard-0000" in full["stderr"], full["stderr"][-3000:]  # names the file
    assert again["rc"] == 0, again["stderr"][-3000:]
    # the rerun generates only the shards the full disk stopped (how many fitted depends on the file system)
    generated = int(re.findall(r"(\d+)/\1 \[", again["stderr"])[-1])
    assert 0 < generated < 240 and generated % 48 == 0, again["stderr"][-2000:]
    copy = tmp_path / "disk_copy" / "pairs"
    names = sorted(p.name for p in reference.iterdir() if p.name.startswith("shard-") or p.name == "index.json")
    assert sorted(p.name for p in copy.iterdir() if not p.name.startswith("config")) == names  # nothing else
    for name in names:
        assert sha256(copy / name) == sha256(reference / name), name


def test_full_disk_during_evaluate_keeps_the_recorded_samples_and_the_rerun_completes(tmp_path, small_filesystem):
    """`dmdx evaluate` writing its samples on a disk that fills up: it stops naming the file, what it
    recorded stays, and the rerun after space is freed generates only the rest: the records and files of
    a run that never ran out of space."""
    import yaml

    from tests.test_evaluate import TEACHER_CONFIG, snapshot

    def config(out):
        path = tmp_path / f"{out.name}.yaml"
        path.write_text(yaml.safe_dump({
            "output": str(out), "prompts": {"source": str(ROOT / "configs/prompts/digits.txt"), "max_prompts": 4},
            "samples_per_prompt": 8, "batch_size": 2, "seed": 3,
            "models": [{"label": "teacher", "source": TEACHER_CONFIG, "teacher": True, "steps": 2}],
            "metrics": [{"class_path": "tests.test_evaluate.MeanPixel"}]}))
        return dmdx("evaluate", "--config", str(path), "--no-progress")

    reference = tmp_path / "reference"
    ok = subprocess.run(config(reference), cwd=ROOT, env=dmdx_env(), capture_output=True, text=True, timeout=300)
    assert ok.returncode == 0, ok.stderr[-3000:]
    written = sum(p.stat().st_size for p in (reference / "teacher").rglob("*") if p.is_file())
    disk = tmp_path / "disk"
    evaluate = config(disk / "eval")
    full, again = on_a_small_disk(disk, 4 * MIB, 4 * MIB - written // 2, evaluate, ["free"], evaluate)
    assert full["rc"] != 0
    assert f"No space left on device: '{disk / 'eval'}" in full["stderr"], full["stderr"][-3000:]
    assert again["rc"] == 0, again["stderr"][-3000:]
    assert snapshot(tmp_path / "disk_copy" / "eval", ("teacher",)) == snapshot(reference, ("teacher",))
