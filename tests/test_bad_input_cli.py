"""Every `pkm` command against the inputs a tired user gives it, through the real entry point:
exit 2, one line on stderr naming the key/file/path, no traceback, nothing under the final output name.
None of these builds a model; each takes seconds."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import ROOT, TINY_GPT, assert_user_error, small_tmpfs
from tests.conftest import run_pkm as _run_pkm

AUSTEN = ROOT / "data_pipeline" / "assets" / "austen"
PERSUASION = AUSTEN / "persuasion.txt"
TOKENIZER_TRAIN = ["data", "tokenizer", "train"]


def run_pkm(*args, **kw):
    """The real entry point, with a timeout a regression hits fast (e.g. a bad config that trains)."""
    return _run_pkm(*args, timeout=180, **kw)


def _leftovers(directory: Path) -> list[str]:
    """Everything in `directory` (hidden temporaries included), or [] if it does not exist."""
    return sorted(p.name for p in directory.iterdir()) if directory.exists() else []


@pytest.fixture()
def bad_files(tmp_path: Path) -> dict[str, Path]:
    files = {
        "empty": tmp_path / "empty.txt",
        "binary": tmp_path / "random.bin",
        "undecodable": tmp_path / "latin1.txt",
        "a_file": tmp_path / "a_file",
    }
    files["empty"].write_text("")
    files["binary"].write_bytes(bytes(range(256)) * 8)
    files["undecodable"].write_bytes("caf\xe9 cr\xe8me\n".encode("latin-1"))
    files["a_file"].write_text("not a directory\n")
    return files


# ---------------------------------------------------------------------------------------------
# pkm data tokenizer train


@pytest.mark.parametrize("kind", ["empty", "binary", "undecodable"])
def test_bad_input_tokenizer_train_without_text_names_the_input(tmp_path, bad_files, kind):
    out = tmp_path / "tok"
    r = run_pkm(*TOKENIZER_TRAIN, "--input", bad_files[kind], "--output", out / "my", "--vocab-size", "500")
    line = assert_user_error(r, bad_files[kind])
    assert "no text to train a tokenizer on" in line and "sentencepiece" not in line and str(out) not in line
    assert _leftovers(out) == []  # no .model/.vocab, no temporary directory


def test_bad_input_tokenizer_train_broken_later_input(tmp_path):
    """A broken file after a good one fails inside sentencepiece's read loop: still named, in our words."""
    good, broken = tmp_path / "good.jsonl", tmp_path / "broken.parquet"
    good.write_text('{"text": "plenty of words to read here"}\n')
    broken.write_bytes(b"PAR1 not really parquet")
    out = tmp_path / "tok"
    r = run_pkm(*TOKENIZER_TRAIN, "--input", good, broken, "--output", out / "my", "--vocab-size", "400")
    line = assert_user_error(r, broken, "cannot read parquet")
    assert "INTERNAL" not in line and "sentencepiece" not in line
    assert _leftovers(out) == []


def test_bad_input_tokenizer_train_vocab_size(tmp_path):
    out = tmp_path / "tok"
    r = run_pkm(*TOKENIZER_TRAIN, "--input", PERSUASION, "--output", out / "my", "--vocab-size", "100")
    line = assert_user_error(r, "--vocab-size 100")
    assert "use at least" in line and "INTERNAL" not in line
    assert _leftovers(out) == []
    r = run_pkm(*TOKENIZER_TRAIN, "--input", PERSUASION, "--output", out / "my", "--vocab-size", "0")
    assert_user_error(r, "--vocab-size")


def test_bad_input_tokenizer_train_output_under_a_file(bad_files):
    out = bad_files["a_file"] / "tok" / "my"
    r = run_pkm(*TOKENIZER_TRAIN, "--input", PERSUASION, "--output", out)
    assert_user_error(r, bad_files["a_file"])
    assert bad_files["a_file"].read_text() == "not a directory\n"


def test_bad_input_tokenizer_train_sigterm_leaves_nothing(tmp_path):
    out = tmp_path / "tok"
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "2"}
    cmd = [sys.executable, "-m", "pkm", *TOKENIZER_TRAIN, "--input", str(AUSTEN / "*.txt"), "--output", str(out / "my")]
    proc = subprocess.Popen(
        [*cmd, "--vocab-size", "4000"], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    deadline = time.monotonic() + 60
    while not _leftovers(out) and time.monotonic() < deadline:  # its temporary directory: it is writing
        time.sleep(0.1)
    assert _leftovers(out), "the tokenizer never started writing"
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM and "Traceback" not in err, err[-2000:]
    assert _leftovers(out) == []


def test_bad_input_tokenizer_train_full_disk(tmp_path):
    with small_tmpfs(tmp_path / "full", "64k") as full:
        r = run_pkm(*TOKENIZER_TRAIN, "--input", PERSUASION, "--output", full / "my", "--vocab-size", "6000")
        assert_user_error(r, full / "my.model")
        assert _leftovers(full) == []


# ---------------------------------------------------------------------------------------------
# pkm export hf: which checkpoint a path names (pretrain.checkpoint.resolve_checkpoint)


def _fake_step(root: Path, name: str = "step_0000005") -> Path:
    step = root / name
    step.mkdir(parents=True)
    (step / "manifest.json").write_text(json.dumps({"format": "pkm-dist-ckpt-1", "files": {}}))
    return step


@pytest.mark.parametrize(
    "case",
    [
        "missing",
        "file",
        "empty_dir",
        "run_dir_no_checkpoints",
        "checkpoints_no_latest",
        "run_dir_no_latest",
        "latest_names_nothing",
        "hf_dir",
        "foreign_manifest",
    ],
)
def test_bad_input_export_path_is_not_a_checkpoint(tmp_path, case):
    run = tmp_path / "run"
    if case == "missing":
        arg, named = run, [run, "no such checkpoint directory"]
    elif case == "file":
        run.write_text("x")
        arg, named = run, [run, "a file"]
    elif case == "empty_dir":
        run.mkdir()
        arg, named = run, [run, "not a `pkm pretrain` checkpoint"]
    elif case == "run_dir_no_checkpoints":
        (run / "checkpoints").mkdir(parents=True)
        arg, named = run, [run / "checkpoints", "no checkpoint saved there yet"]
    elif case in ("checkpoints_no_latest", "run_dir_no_latest"):
        step = _fake_step(run / "checkpoints")
        arg = run / "checkpoints" if case == "checkpoints_no_latest" else run
        named = [run / "checkpoints", "no `latest`", f"e.g. {step}"]  # says what to pass instead
    elif case == "latest_names_nothing":
        (run / "checkpoints").mkdir(parents=True)
        (run / "checkpoints" / "latest").write_text("step_0000100\n")
        arg, named = run, [run / "checkpoints" / "latest", "step_0000100"]
    elif case == "hf_dir":
        run.mkdir()
        (run / "config.json").write_text("{}")
        arg, named = run, [run, "Hugging Face model directory"]
    else:  # a manifest.json of something else
        run.mkdir()
        (run / "manifest.json").write_text(json.dumps({"files": {"a": 1}}))
        arg, named = run, [run / "manifest.json", "not the manifest of a `pkm pretrain` checkpoint"]
    out = tmp_path / "export"
    r = run_pkm("export", "hf", arg, out)
    assert_user_error(r, *named)
    assert not out.exists()


# ---------------------------------------------------------------------------------------------
# pkm pretrain / pkm launch: --config files of the wrong kind


@pytest.mark.parametrize("kind", ["directory", "binary", "json_list", "empty", "missing"])
@pytest.mark.parametrize("command", [["pretrain"], ["launch", "slurm", "--nodes", "1", "--dry-run"]])
def test_bad_input_config_file_of_the_wrong_kind(tmp_path, bad_files, kind, command):
    path = {
        "directory": tmp_path,
        "binary": bad_files["binary"],
        "empty": bad_files["empty"],
        "json_list": tmp_path / "list.json",
        "missing": tmp_path / "nope.yaml",
    }[kind]
    if kind == "json_list":
        path.write_text("[1, 2]\n")
    r = run_pkm(*command, "--config", path, f"run_dir={tmp_path / 'run'}")
    assert_user_error(r, path)
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------------------------------------
# numbers out of range, and outputs that cannot be written, for every command


@pytest.mark.parametrize(
    "argv,option",
    [
        (["data", "preprocess", "--input", "x.txt", "--output", "o", "--workers", "-3"], "--workers"),
        (
            ["data", "preprocess", "--input", "x.txt", "--output", "o", "--max-sentence-tokens", "0"],
            "--max-sentence-tokens",
        ),
        (["data", "tokenizer", "train", "--input", "x.txt", "--output", "o", "--threads", "zero"], "--threads"),
        (["data", "inspect", "o", "--show", "-1"], "--show"),
        (["finetune", "m", "--steps", "0"], "--steps"),
        (["finetune", "m", "--lr", "nan"], "--lr"),
        (["eval", "online", "--model", "m", "--max-docs", "0"], "--max-docs"),
        (
            ["launch", "deepspeed", "--hosts", "a", "--slots", "1", "--master-port", "99999", "--config", "c"],
            "--master-port",
        ),
        (
            [
                "launch",
                "torchrun",
                "--nnodes",
                "1",
                "--node-rank",
                "0",
                "--rdzv-endpoint",
                "h:1",
                "--shutdown-timeout",
                "-1",
                "--config",
                "c",
            ],
            "--shutdown-timeout",
        ),
        (["data", "preprocess", "--input", "x.txt", "--output", "tests/"], "tests/ is a directory"),
        (["data", "tokenizer", "train", "--input", "x.txt", "--output", "tests"], "tests is a directory"),
        (["data", "preprocess", "--input", "x.txt"], "--output"),  # a missing argument: one line too
    ],
)
def test_bad_input_numeric_options(argv, option):
    assert_user_error(run_pkm(*argv), option)


def test_bad_input_unwritable_outputs(bad_files):
    under = bad_files["a_file"] / "sub"
    for argv in (
        ["pretrain", "--config", TINY_GPT, f"run_dir={under}"],
        ["eval", "online", "--model", "smollm2", "--out", under],
        ["eval", "lm-eval-data", "--out", under / "books.jsonl"],
        ["data", "preprocess", "--input", PERSUASION, "--output", under / "ds"],
        ["launch", "deepspeed", "--hosts", "a", "--slots", "1", "--config", TINY_GPT, f"run_dir={under}"],
        ["launch", "slurm", "--nodes", "1", "--config", TINY_GPT, f"run_dir={under}"],
    ):
        r = run_pkm(*argv)
        if argv[1] == "slurm" and "sbatch" in r.stderr:
            continue  # no SLURM on this machine: refused before anything is written, as it should be
        assert_user_error(r, bad_files["a_file"])
    assert bad_files["a_file"].read_text() == "not a directory\n"


def test_bad_input_lm_eval_data_full_disk(tmp_path):
    with small_tmpfs(tmp_path / "full", "64k") as full:
        r = run_pkm("eval", "lm-eval-data", "--out", full / "books.jsonl")
        assert_user_error(r, full / "books.jsonl", "No space left")
        assert _leftovers(full) == []


# ---------------------------------------------------------------------------------------------
# pkm finetune: model directories of the wrong kind, checked before any model spends its budget


def test_bad_input_finetune_model_dir_of_the_wrong_kind(tmp_path, bad_files):
    empty = tmp_path / "empty"
    empty.mkdir()
    run = tmp_path / "run"
    _fake_step(run / "checkpoints")
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text("{}")
    out = tmp_path / "ft"
    assert_user_error(run_pkm("finetune", tmp_path / "nope", "--out", out), tmp_path / "nope")
    assert_user_error(run_pkm("finetune", bad_files["a_file"], "--out", out), bad_files["a_file"])
    assert_user_error(run_pkm("finetune", empty, "--out", out), empty, "no config.json")
    assert_user_error(run_pkm("finetune", run, "--out", out), run, "pkm export hf")
    # the second model is refused before the first one is finetuned
    assert_user_error(run_pkm("finetune", hf, empty, "--out", out), empty)
    assert_user_error(run_pkm("finetune", hf, "--out", out), hf, "cannot load")
    assert not out.exists()


# ---------------------------------------------------------------------------------------------
# pkm eval online: the corpus and the model path are checked before the model loads


def test_bad_input_eval_online_corpus_and_model(tmp_path, bad_files):
    binary_jsonl = tmp_path / "docs.jsonl"
    binary_jsonl.write_bytes(bad_files["binary"].read_bytes())
    out = tmp_path / "eval"
    for corpus in (binary_jsonl, bad_files["binary"], tmp_path / "nope", bad_files["empty"]):
        assert_user_error(
            run_pkm("eval", "online", "--model", tmp_path / "no-model", "--corpus", corpus, "--out", out), corpus
        )
    run = tmp_path / "run"
    step = _fake_step(run / "checkpoints")
    line = assert_user_error(run_pkm("eval", "online", "--model", run, "--max-docs", "1", "--out", out), run)
    assert f"e.g. {step}" in line
    assert not out.exists()


# ---------------------------------------------------------------------------------------------
# the same paths on a real run (the tiny PKM-GPT, 2 steps)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("tiny_run")
    run = tmp / "run"
    r = _run_pkm(
        "pretrain",
        "--config",
        TINY_GPT,
        f"run_dir={run}",
        "train.train_steps=2",
        "logging.tensorboard=false",
        f"data.cache_dir={tmp / 'cache'}",
    )
    assert r.returncode == 0, r.stderr[-3000:]
    return run


@pytest.mark.slow
def test_bad_input_export_run_dir_without_latest(tiny_run, tmp_path):
    """A run directory exports its latest checkpoint; without `latest` the error says which to pass."""
    (tmp_path / "a_file").write_text("x")
    out = tmp_path / "hf"
    r = _run_pkm("export", "hf", tiny_run, out)
    assert r.returncode == 0 and f"exported to {out}" in r.stdout, r.stderr[-3000:]
    latest = tiny_run / "checkpoints" / "latest"
    saved = latest.read_text()
    latest.unlink()
    try:
        for arg in (tiny_run, tiny_run / "checkpoints"):
            r = run_pkm("export", "hf", arg, tmp_path / "hf2")
            assert_user_error(r, tiny_run / "checkpoints", f"e.g. {tiny_run / 'checkpoints' / saved.strip()}")
        assert not (tmp_path / "hf2").exists()
    finally:
        latest.write_text(saved)
    r = run_pkm("export", "hf", tiny_run, tmp_path / "a_file" / "hf")  # an output that cannot be written
    assert_user_error(r, tmp_path / "a_file")
    # resuming from a path that names no checkpoint: refused before the model is built
    empty = tmp_path / "empty_run"
    (empty / "checkpoints").mkdir(parents=True)
    r = run_pkm("pretrain", "--config", TINY_GPT, f"run_dir={tmp_path / 'new'}", "--resume", empty)
    assert_user_error(r, empty / "checkpoints", "no checkpoint saved there yet")
    assert not (tmp_path / "new").exists()


# ---------------------------------------------------------------------------------------------
# pkm data inspect: a file of the dataset instead of its prefix, and a truncated dataset


def test_bad_input_inspect_given_a_dataset_file(tmp_path):
    prefix = tmp_path / "ds"
    r = run_pkm("data", "preprocess", "--input", PERSUASION, "--output", prefix, "--workers", "1", "--no-progress")
    assert r.returncode == 0, r.stderr[-2000:]
    for given in (f"{prefix}.bin", f"{prefix}.idx", f"{prefix}.manifest.json"):
        r = run_pkm("data", "inspect", given)
        assert r.returncode == 0 and r.stdout.startswith(f"{prefix}: gpt dataset"), r.stderr[-2000:]
    bin_ = Path(f"{prefix}.bin")
    bin_.write_bytes(bin_.read_bytes()[:100])
    assert_user_error(run_pkm("data", "inspect", bin_), f"{prefix}.bin", "but its manifest records")
    assert_user_error(run_pkm("data", "inspect", tmp_path / "nope.bin"), tmp_path / "nope")
