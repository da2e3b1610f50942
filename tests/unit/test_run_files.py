"""Run folders in one process: --config files, --resume option checks, checkpoint retention and
verification, failed writes (full disk, read-only folder: one line, no temporary file), and the
TensorBoard scalars against metrics.jsonl."""
import dataclasses
import json
import os
import shutil

import pytest
import torch

from parml.comm import SelfComm
from parml.config import TENSORBOARD_MISSING, ConfigError, TrainConfig
from parml.training import checkpoint, files
from parml.training.report import read_metrics, scalars
from parml.training.trainer import resolve_options, train
from smallfs import remount_readonly, small_tmpfs, temporaries

pytestmark = pytest.mark.usefixtures("one_thread")
BASE = dict(blocks=32, levels=3, dtype="float64", optimizer="momentum", lr=0.05, max_cycles=6,
            target_accuracy=None, progress=False, min_blocks_per_rank=4)


def run(tmp, name, **options):
    cfg = TrainConfig(**{**BASE, "out": str(tmp), "run_name": name, **options})
    summary = train(cfg, SelfComm())
    return summary, tmp / name


def losses(folder):
    return [r["loss"] for r in read_metrics(str(folder))]


def names(folder):
    return sorted(os.listdir(folder / "checkpoints"))


# -- --config ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("text,needle", [
    ("lr = = 1\n", "is not valid TOML"),
    ("lrr = 0.5\nblocksx = 3\n", "unknown option(s) blocksx, lrr"),
    ('blocks = "abc"\n', "--blocks 'abc' is not an integer"),
    ("lr = true\n", "--lr True is not a number"),
    ("levels = 2.5\n", "--levels 2.5 is not an integer"),
])
def test_bad_config_file_is_one_line(text, needle, tmp_path):
    path = tmp_path / "run.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as e:
        resolve_options(str(path), {})
    assert "\n" not in str(e.value) and needle in str(e.value) and str(path) in str(e.value), str(e.value)


def test_flags_override_the_config_file(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text('lr = 0.5\nblocks = 64\nlevels = 3\nactivation = "tanh"\n')
    cfg = resolve_options(str(path), {"lr": "0.05", "out": str(tmp_path)})
    assert (cfg.lr, cfg.blocks, cfg.activation) == (0.05, 64, "tanh")


def test_config_toml_replays_the_run_exactly(tmp_path):
    _, a = run(tmp_path, "a", activation="tanh", beta=1e-3)
    cfg = resolve_options(str(a / "config.toml"), {"run_name": "b"})
    assert dataclasses.replace(cfg, run_name="a") == TrainConfig.from_options(TrainConfig.saved(str(a)))
    train(cfg, SelfComm())
    assert losses(a) == losses(tmp_path / "b")           # bit for bit
    fa, fb = (torch.load(f / "final.pt", weights_only=False) for f in (a, tmp_path / "b"))
    assert all(torch.equal(fa[k], fb[k]) for k in fa)
    cfg = resolve_options(str(a / "config.toml"), {"run_name": "c", "lr": "0.02"})    # a flag overrides
    assert dataclasses.replace(cfg, run_name="a", lr=0.05) == TrainConfig.from_options(TrainConfig.saved(str(a)))


# -- --resume option checks -------------------------------------------------------------------------
def test_resume_lists_every_changed_option_and_allows_run_time_ones(tmp_path):
    _, a = run(tmp_path, "a", checkpoint_every=3)
    with pytest.raises(ConfigError) as e:
        resolve_options(None, {"resume": str(a), "lr": "0.5", "blocks": "64", "max_cycles": "9"})
    msg = str(e.value)
    assert "\n" not in msg and "--blocks 32 -> 64" in msg and "--lr 0.05 -> 0.5" in msg, msg
    assert "--max-cycles" not in msg
    cfg = resolve_options(None, {"resume": str(a), "max_cycles": "9", "eval_every": "2", "threads": "1",
                                 "checkpoint_every": "2", "comm_timeout": "60", "progress": "false"})
    assert (cfg.max_cycles, cfg.eval_every, cfg.checkpoint_every, cfg.comm_timeout, cfg.lr) == (9, 2, 2, 60.0, 0.05)


# -- checkpoints: retention and verification ---------------------------------------------------------
def test_keep_checkpoints_keeps_the_newest_verified(tmp_path):
    _, a = run(tmp_path, "a", checkpoint_every=1, keep_checkpoints=3)
    assert names(a) == ["cycle-000004", "cycle-000005", "cycle-000006"]
    shard = a / "checkpoints" / "cycle-000006" / "rank0.pt"
    shard.write_bytes(shard.read_bytes()[:-10])            # the newest is damaged: not verified
    assert checkpoint.prune(str(a), 2, set()) == []        # 5 and 4 are the two verified ones: both stay
    assert checkpoint.prune(str(a), 1, set()) == [str(a / "checkpoints" / "cycle-000004")]
    assert names(a) == ["cycle-000005", "cycle-000006"]


def test_a_checkpoint_that_reads_back_wrong_is_not_kept_and_removes_nothing(tmp_path, monkeypatch):
    summary, a = run(tmp_path, "a", checkpoint_every=2, max_cycles=4)
    levels = summary["levels"]
    monkeypatch.setattr(files, "file_digest", lambda path: "0" * 64)      # the disk returns other bytes
    with pytest.raises(files.WriteError, match=r"cycle-000006/rank0.pt: the file read back differs .*\(EIO\)"):
        checkpoint.save(str(a), SelfComm(), 6, levels[-1].model, levels, {}, keep=1)
    assert names(a) == ["cycle-000002", "cycle-000004"] and not temporaries(a)
    monkeypatch.undo()
    checkpoint.save(str(a), SelfComm(), 6, levels[-1].model, levels, {}, keep=1)
    assert names(a) == ["cycle-000006"]


# -- failed writes ----------------------------------------------------------------------------------
def test_full_disk_is_one_line_naming_file_error_and_last_checkpoint(tmp_path):
    with small_tmpfs(tmp_path / "small", 300 * 1024) as small:
        with pytest.raises(files.WriteError) as e:      # shards of ~155 KB: the second does not fit
            train(TrainConfig(**{**BASE, "width": 24, "blocks": 64, "dtype": "float32", "optimizer": "sgd",
                                 "max_cycles": 10,
                                 "checkpoint_every": 1, "out": small, "run_name": "r"}), SelfComm())
        msg, folder = str(e.value), os.path.join(small, "r")
        assert "\n" not in msg and msg.startswith(f"cannot write {folder}/checkpoints/cycle-000002/rank0.pt: "
                                                  f"No space left on device (ENOSPC); last complete checkpoint: "
                                                  f"{folder}/checkpoints/cycle-000001"), msg
        assert not temporaries(small) and sorted(os.listdir(f"{folder}/checkpoints")) == ["cycle-000001"]
        assert [r["cycle"] for r in read_metrics(folder)] == [1, 2]
        assert checkpoint.complete_checkpoints(folder) == [f"{folder}/checkpoints/cycle-000001"]


def test_read_only_checkpoint_folder_is_one_line(tmp_path):
    _, a = run(tmp_path, "a", checkpoint_every=2, max_cycles=4)
    saved = tmp_path / "saved"
    shutil.copytree(a / "checkpoints", saved)
    with small_tmpfs(a / "checkpoints", 1 << 20):
        shutil.copytree(saved, a / "checkpoints", dirs_exist_ok=True)
        remount_readonly(a / "checkpoints")
        cfg = resolve_options(None, {"resume": str(a), "max_cycles": "8"})
        with pytest.raises(files.WriteError) as e:
            train(cfg, SelfComm())
    msg = str(e.value)
    assert msg == (f"cannot write {a}/checkpoints/cycle-000006: Read-only file system (EROFS); "
                   f"last complete checkpoint: {a}/checkpoints/cycle-000004"), msg
    assert [r["cycle"] for r in read_metrics(str(a))] == [1, 2, 3, 4, 5, 6]


def test_a_torn_last_metrics_line_is_dropped(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"cycle": 1}\n{"cycle": 2}\n{"cyc')
    assert read_metrics(str(tmp_path)) == [{"cycle": 1}, {"cycle": 2}]
    (tmp_path / "metrics.jsonl").write_text('{"cycle": 1}\n{"cyc\n{"cycle": 3}\n')
    with pytest.raises(ValueError):
        read_metrics(str(tmp_path))


# -- TensorBoard ------------------------------------------------------------------------------------
def test_tensorboard_scalars_equal_metrics_jsonl(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _, a = run(tmp_path, "a", tensorboard=True, eval_every=2, max_cycles=5, lr_schedule="cosine", cascade=1,
               cascade_cycles=2)
    acc = EventAccumulator(str(a / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    got = {tag: {(e.step, e.value) for e in acc.Scalars(tag)} for tag in acc.Tags()["scalars"]}
    want = {}
    for step, row in enumerate(read_metrics(str(a)), start=1):
        for tag, value in scalars(row):
            want.setdefault(tag, set()).add((step, value))
    assert {"loss", "val_loss", "val_acc", "work_units", "seconds", "lr", "level_seconds/level3"} <= set(want)
    assert set(got) == set(want)
    for tag in want:
        ref = sorted(want[tag])
        assert [s for s, _ in sorted(got[tag])] == [s for s, _ in ref], tag
        for (_, v), (_, r) in zip(sorted(got[tag]), ref):
            assert abs(v - r) <= 1e-6 * max(abs(r), 1e-30), (tag, v, r)      # TensorBoard keeps float32


def test_missing_tensorboard_is_one_line(tmp_path, monkeypatch):
    import importlib.util
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "tensorboard" else real(name, *a))
    with pytest.raises(ConfigError, match=r"pip install 'parml\[tb\]'") as e:
        TrainConfig(tensorboard=True, out=str(tmp_path)).validate()
    assert str(e.value) == TENSORBOARD_MISSING


def test_run_files_are_json_and_whole(tmp_path):
    _, a = run(tmp_path, "a", checkpoint_every=3)
    assert json.loads((a / "summary.json").read_text())["cycles"] == 6
    assert not temporaries(tmp_path)


def test_the_first_run_says_it_compiles_the_fused_kernels(tmp_path, monkeypatch, capsys):
    """A run whose chunks take the fused CPU kernel says, before the first cycle, that it compiles
    them where numba's cache beside the module has no index yet; not once it has, nor with
    ``--kernel torch``."""
    from parml.kernels import cpu
    if not cpu.available()[0]:
        pytest.skip(cpu.available()[1])
    cache = tmp_path / "cache"
    cache.mkdir()
    monkeypatch.setattr(cpu, "_cache_dir", lambda: cache)
    monkeypatch.delenv("NUMBA_CACHE_DIR", raising=False)
    notice = "compiling the fused CPU kernels"
    assert cpu.needs_compile()
    run(tmp_path, "fresh", kernel="fused", max_cycles=1)
    assert notice in capsys.readouterr().out
    run(tmp_path, "torch", kernel="torch", max_cycles=1)
    assert notice not in capsys.readouterr().out
    (cache / "_numba_dense.forward-342.py311.nbi").write_bytes(b"")
    assert not cpu.needs_compile()
    run(tmp_path, "cached", kernel="fused", max_cycles=1)
    assert notice not in capsys.readouterr().out
    monkeypatch.setenv("NUMBA_CACHE_DIR", str(cache))
    (cache / "_numba_dense.forward-342.py311.nbi").unlink()
    assert not cpu.needs_compile()           # the cache lives elsewhere: unsure, so silent
