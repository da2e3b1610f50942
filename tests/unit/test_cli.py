"""The command line as a user runs it: defaults, run folder contents, one-line errors."""
import json

import pytest

from multiproc import launch, parml_batch


def parml(*args, timeout=300, cwd=None):
    """`parml ARGS` in one process, a clean environment, killed with its children at the deadline."""
    return launch("serial", 1, list(args), cwd, timeout=timeout)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_defaults_reach_full_accuracy_and_write_a_run_folder(tmp_path):
    r = parml("train", "--out", str(tmp_path), "--no-progress")
    assert r.returncode == 0, r.stderr
    assert "reached val acc 1.0" in r.stdout
    folder = tmp_path / "circles-L8-K2048-s0"
    summary = json.loads((folder / "summary.json").read_text())
    config = json.loads((folder / "config.json").read_text())
    assert summary["reached_target"] and summary["val_acc"] == 1.0
    assert config["blocks"] == 2048 and config["levels"] == 8 and config["cycle_resolved"] == "[(1),1,1,1,2,2,2,{2}]"
    rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == summary["cycles"]
    assert [r["cycle"] for r in rows] == list(range(1, len(rows) + 1))
    assert abs(rows[-1]["work_units"] - 5.1875 * len(rows)) < 1e-9
    assert (folder / "plot.png").stat().st_size > 10_000


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_eight_levels_need_fewer_work_units_than_one(tmp_path):
    units = {}
    for levels in (1, 8):
        r = parml("train", "-K", "256", "-L", str(levels), "--out", str(tmp_path), "--no-progress")
        assert r.returncode == 0, r.stderr
        summary = json.loads((tmp_path / f"circles-L{levels}-K256-s0" / "summary.json").read_text())
        assert summary["reached_target"]
        units[levels] = summary["work_units"]
    assert units[8] * 2 < units[1], units


@pytest.mark.timeout(120)
def test_glorot_init_trains_and_is_recorded(tmp_path):
    r = parml("train", "-K", "64", "-L", "3", "--init", "glorot", "--out", str(tmp_path), "--no-progress")
    assert r.returncode == 0, r.stderr
    assert "reached val acc 1.0" in r.stdout
    folder = tmp_path / "circles-L3-K64-s0"
    assert json.loads((folder / "summary.json").read_text())["reached_target"]
    assert json.loads((folder / "config.json").read_text())["init"] == "glorot"


BAD = [
    (["-K", "2048", "-L", "13"], "--levels 13"),
    (["-K", "96", "-L", "7"], "--blocks 96"),
    (["-L", "4", "--cycle", "[(1),{2}]"], "--cycle"),
    (["-L", "2", "--cycle", "[(1),x]"], "--cycle"),
    (["--lr", "0"], "--lr"),
    (["--lr", "-1"], "--lr"),
    (["--levels", "0"], "--levels"),
    (["--blocks", "0"], "--blocks"),
    (["--beta", "-1"], "--beta"),
    (["--schedule", "zigzag"], "--schedule"),
    (["--weight-grads", "later"], "--weight-grads"),
    (["--activation", "gelu"], "--activation"),
    (["--stepper", "rk9"], "--stepper"),
    (["--init", "he"], "--init"),
    (["--microbatches", "0"], "--microbatches"),
    (["--target-accuracy", "1.5"], "--target-accuracy"),
    (["--backend", "carrier-pigeon"], "--backend"),
    (["--ranks", "4"], "--ranks 4"),
    (["--dataset", "mnist", "--data-dir", "/nonexistent"], "/nonexistent"),
    (["--dataset", "imagenet"], "imagenet"),
    (["--dataset", "mnist"], "--data-dir"),
    (["-K", "8", "-L", "1", "--batch-size", "2", "-M", "4"], "--microbatches 4"),
    (["--min-blocks-per-rank", "0"], "--min-blocks-per-rank 0"),
    (["--checkpoint-every", "-1"], "--checkpoint-every -1"),
    (["--resume", "/nonexistent/run"], "--resume"),
    (["-K", "100", "-L", "1", "--cascade", "3"], "--cascade 3"),
    (["--lr-min", "1.0"], "--lr-min"),
    (["--eval-every", "0"], "--eval-every 0"),
    (["--comm-timeout", "0"], "--comm-timeout"),
    (["--max-cycles", "0"], "--max-cycles 0"),
    (["--T", "0"], "--T"),
    (["--width", "0"], "--width 0"),
    (["--threads", "0"], "--threads 0"),
    (["--dataset", "cifar10"], "--data-dir"),
    (["--device", "tpu"], "--device"),
]


@pytest.fixture(scope="module")
def bad_runs(tmp_path_factory):
    """Every BAD command line, each with its own --out folder, in one process (parml_batch)."""
    root = tmp_path_factory.mktemp("bad")
    return parml_batch([["train", *args, "--out", str(root / str(i)), "--no-progress"]
                        for i, (args, _) in enumerate(BAD)], timeout=240)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("case", range(len(BAD)), ids=[" ".join(a) for a, _ in BAD])
def test_bad_input_is_one_line_naming_the_option(case, bad_runs):
    needle, r = BAD[case][1], bad_runs[case]
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    assert "Traceback" not in r.stderr
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, r.stderr
    assert needle in lines[0], lines[0]


def test_help_lists_the_options():
    r = parml("train", "--help")
    assert r.returncode == 0
    for opt in ("--levels", "--cycle", "--metric", "--init", "--microbatches", "--schedule", "--backend"):
        assert opt in r.stdout


@pytest.mark.timeout(60)
def test_corrupt_data_file_is_one_line(tmp_path):
    (tmp_path / "t10k-images-idx3-ubyte").write_bytes(b"\x00\x00\x08\x03" + b"\x00\x00\x00\x05" * 3 + b"abc")
    (tmp_path / "t10k-labels-idx1-ubyte").write_bytes(b"\x00\x00\x08\x01\x00\x00\x00\x05" + bytes(5))
    r = parml("train", "--dataset", "mnist", "--data-dir", str(tmp_path), "--out", str(tmp_path), timeout=60)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "t10k-images-idx3-ubyte" in r.stderr, r.stderr


def test_info_reports_backends_and_the_exact_1f1b_order():
    r = parml("info", "--schedule", "1f1b", "-P", "2", "-M", "3", timeout=60)
    assert r.returncode == 0, r.stderr
    end = r.stdout.rindex("}") + 1
    info = json.loads(r.stdout[:end])
    assert info["parml"] and info["torch"]
    # 1F1B on P = 2, M = 3: stage 0 runs P - 0 = 2 warm-up forwards, stage 1 alternates from the start
    assert r.stdout[end:].strip().splitlines() == [
        "stage 0: 0F0 0F1 0B0 0F2 0B1 0B2",
        "stage 1: 1F0 1B0 1F1 1B1 1F2 1B2",
        "8 unit time steps (ideal 2(M+P-1) = 8)"]
