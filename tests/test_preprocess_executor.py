"""`pkm data preprocess --executor local|slurm` (datatrove): the same dataset as the single-node path.

Real components: datatrove's LocalPipelineExecutor (forked task processes) and SlurmPipelineExecutor
(a job array on the two-node SLURM cluster of tests/slurm_cluster.py), megatron-core's builder,
the bundled Austen novels and tokenizer, the real `pkm` entry point.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from data_pipeline.preprocess import AUSTEN_DIR, demo_files, is_complete, preprocess, read_manifest
from tests.conftest import ROOT, assert_user_error, run_pkm
from tests.slurm_cluster import slurm_cluster  # noqa: F401  (the fixture)

NOVELS = os.path.join(AUSTEN_DIR, "*.txt")
MODE = ["--text-mode", "blank-line"]  # one document per paragraph, as the demo corpus
PREPROCESS = ["data", "preprocess", "--input"]


def same_dataset(a: str, b: str) -> None:
    for ext in (".bin", ".idx"):
        assert Path(a + ext).read_bytes() == Path(b + ext).read_bytes(), f"{a}{ext} differs from {b}{ext}"
    ma, mb = read_manifest(a), read_manifest(b)
    for key in (
        "documents",
        "sequences",
        "tokens",
        "tokenizer",
        "dtype",
        "sources",
        "skipped_total",
        "skipped",
        "skipped_by_reason",
        "options",
        "files",
    ):
        assert ma[key] == mb[key], key


def leftovers(prefix: Path) -> list[str]:
    """Files or dirs next to the output that carry its name, other than datatrove's logs."""
    return sorted(p.name for p in prefix.parent.glob(prefix.name + "*"))


@pytest.fixture(scope="module")
def single_node(tmp_path_factory) -> str:
    """The reference: today's single-node path on the bundled novels."""
    prefix = str(tmp_path_factory.mktemp("single") / "austen")
    preprocess([NOVELS], prefix, workers=1, text_mode="blank-line", progress=False)
    return prefix


def test_executor_local_matches_single_node(single_node, tmp_path):
    prefix = tmp_path / "austen"
    r = run_pkm(*PREPROCESS, NOVELS, "--output", prefix, *MODE, "--executor", "local", "--tasks", "4", "--workers", "2")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "over 4 tasks" in r.stdout
    same_dataset(single_node, str(prefix))
    m = read_manifest(str(prefix))
    assert m["tasks"] == 4 and m["executor"] == "local" and m["merge_s"] >= 0
    # the parts and the plan are gone after the merge; datatrove's logs stay
    parts = prefix.parent / "austen.parts"
    assert sorted(p.name for p in parts.iterdir()) == ["logs"]
    assert sorted(p.name for p in (parts / "logs" / "completions").iterdir()) == [f"{i:05d}" for i in range(4)]
    assert leftovers(prefix) == ["austen.bin", "austen.idx", "austen.manifest.json", "austen.parts"]


def test_executor_local_rerun_after_a_killed_task_redoes_only_unfinished(single_node, tmp_path):
    prefix = tmp_path / "austen"
    local = ["--executor", "local", "--tasks", "6", "--workers", "1"]
    argv = [sys.executable, "-m", "pkm", *PREPROCESS, NOVELS, "--output", str(prefix), *MODE, *local]
    done = prefix.parent / "austen.parts" / "logs" / "completions"
    proc = subprocess.Popen(
        argv,
        cwd=ROOT,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    deadline = time.monotonic() + 600
    while not (done / "00001").exists():  # tasks run one after the other: kill the third mid-way
        assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read().decode()[-3000:]
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    finished = sorted(p.name for p in done.iterdir())
    assert 2 <= len(finished) < 6, finished
    assert not (prefix.parent / "austen.bin").exists() and not is_complete(str(prefix))
    task_logs = prefix.parent / "austen.parts" / "logs" / "logs"
    before = {n: (task_logs / f"task_{n}.log").stat().st_mtime_ns for n in finished}

    r = run_pkm(*argv[3:])
    assert r.returncode == 0, r.stderr[-3000:]
    same_dataset(single_node, str(prefix))
    # finished tasks did not run again (datatrove rewrites a task's log when it runs it)
    assert {n: (task_logs / f"task_{n}.log").stat().st_mtime_ns for n in finished} == before
    assert sorted(p.name for p in done.iterdir()) == [f"{i:05d}" for i in range(6)]


def _jsonl_shards(dir: Path, n: int) -> list[Path]:
    """The novels' paragraphs as n jsonl files (paragraph i goes to file i*n // total)."""
    paras = []
    for f in demo_files():
        paras += [b.strip("\r\n") for b in re.split(r"\n[ \t]*\n", open(f, encoding="utf-8").read()) if b.strip()]
    paras = paras[:2000]
    files = [dir / f"shard{i}.jsonl" for i in range(n)]
    for i, f in enumerate(files):
        f.write_text(
            "".join(json.dumps({"text": p}) + "\n" for p in paras[i * len(paras) // n : (i + 1) * len(paras) // n])
        )
    return files


def test_executor_bad_record_in_third_task(tmp_path):
    files = _jsonl_shards(tmp_path, 4)
    lines = files[2].read_text().splitlines(keepends=True)  # file 2 is task 2's (the third) with --tasks 4
    lines[4] = '{"text": "broken\n'
    files[2].write_text("".join(lines))
    inputs = [str(tmp_path / "shard*.jsonl")]
    out = tmp_path / "out" / "ds"

    argv = [*PREPROCESS, *inputs, "--output", out, "--executor", "local", "--tasks", "4", "--workers", "2"]
    r = run_pkm(*argv)
    line = assert_user_error(r, f"{files[2]}:5")
    assert "malformed JSON" in line and "--on-error skip" in line
    assert not is_complete(str(out)) and not (out.parent / "ds.bin").exists()

    r = run_pkm(*argv, "--on-error", "skip")
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"skipped {files[2]}:5: malformed JSON" in r.stdout
    m = read_manifest(str(out))
    assert m["skipped_total"] == 1 and m["skipped"][0]["source"] == str(files[2]) and m["skipped"][0]["line"] == 5
    assert [s["skipped"] for s in m["sources"]] == [0, 0, 1, 0]
    ref = str(tmp_path / "ref" / "ds")
    preprocess(inputs, ref, workers=1, on_error="skip", progress=False)
    same_dataset(ref, str(out))


@pytest.mark.parametrize(
    "args, names",
    [
        (["--executor", "local", "--tasks", "0"], ["--tasks", "0 is not a positive integer"]),
        (["--executor", "local", "--tasks", "2", "--workers", "-3"], ["--workers", "-3 is not"]),
        (["--workers", "-3"], ["--workers", "-3 is not"]),
        (["--executor", "local"], ["--tasks"]),
        (["--tasks", "2"], ["--tasks", "--executor"]),
        (["--executor", "local", "--tasks", "2", "--slurm-partition", "cpu"], ["--slurm-partition"]),
        (["--executor", "slurm", "--tasks", "2", "--slurm-cpus-per-task", "0"], ["--slurm-cpus-per-task", "0 is not"]),
    ],
)
def test_executor_bad_options_are_one_line_errors(tmp_path, args, names):
    out = tmp_path / "ds"
    r = run_pkm(*PREPROCESS, NOVELS, "--output", out, *args)
    assert_user_error(r, *names)
    assert leftovers(out) == []


def test_executor_missing_input_and_unwritable_output(tmp_path):
    local = ["--executor", "local", "--tasks", "2"]
    r = run_pkm(*PREPROCESS, str(tmp_path / "nope*.jsonl"), "--output", tmp_path / "ds", *local)
    assert_user_error(r, str(tmp_path / "nope*.jsonl"))
    assert leftovers(tmp_path / "ds") == []
    blocker = tmp_path / "file"  # a regular file where the output directory should be (root ignores modes)
    blocker.write_text("x")
    for extra in (local, []):
        r = run_pkm(*PREPROCESS, NOVELS, "--output", blocker / "ds", *extra)
        assert_user_error(r, str(blocker / "ds"), "cannot be created")


def test_executor_and_launch_describe_a_slurm_job_alike(tmp_path):
    """`pkm launch slurm` and the preprocessing job array render one SlurmJob the same way."""
    from data_pipeline.distributed_preprocess import make_plan, slurm_executors
    from data_pipeline.slurm_job import SlurmJob
    from data_pipeline.tokenizer import load_tokenizer
    from launch.slurm import SlurmOptions, render_sbatch
    from launch.training import Entry

    job = SlurmJob(time="04:00:00", partition="cpu", account="proj7", cpus_per_task=3, sbatch_lines=["--qos=high"])
    opts = SlurmOptions(
        nodes=1,
        time=job.time,
        partition=job.partition,
        account=job.account,
        cpus_per_task=job.cpus_per_task,
        sbatch_lines=job.sbatch_lines,
    )
    assert opts.job() == job
    train = render_sbatch(opts, Entry("pkm", ("pretrain",)), tmp_path / "run", "/venv/bin/python", tmp_path)
    plan = make_plan([NOVELS], str(tmp_path / "ds"), load_tokenizer(None), 4, "fail", "text", "file", "gpt", 256)
    tokenize, merge = slurm_executors(plan, job, workers=2)
    array = tokenize.get_launch_file_contents(tokenize.get_sbatch_args(4), "true")
    for line in [
        "#SBATCH --time=04:00:00",
        "#SBATCH --partition=cpu",
        "#SBATCH --account=proj7",
        "#SBATCH --qos=high",
        "#SBATCH --cpus-per-task=3",
    ]:
        assert line in train.splitlines() and line in array.splitlines(), line
    assert "#SBATCH --array=0-3%2" in array.splitlines()
    for absent in ("None", "--mem-per-cpu", "--qos=normal"):
        assert absent not in array
    check = subprocess.run(["bash", "-n"], input=array, text=True, capture_output=True)
    assert check.returncode == 0, check.stderr


@pytest.mark.slurm
@pytest.mark.slow
def test_executor_slurm_job_array_on_two_nodes(slurm_cluster, single_node, tmp_path):
    prefix = tmp_path / "austen"
    env = {**slurm_cluster.env, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    slurm = ["--executor", "slurm", "--tasks", "4", "--slurm-partition", "debug", "--slurm-time", "00:20:00"]
    slurm += ["--slurm-account", "pkmtest", "--slurm-cpus-per-task", "1"]
    slurm += ["--slurm-sbatch=--comment=pkm-preprocess-test"]
    r = run_pkm(*PREPROCESS, NOVELS, "--output", prefix, *MODE, *slurm, env=env, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    m = re.search(r"Submitted SLURM job array (\d+) \(4 of 4 tasks\) and merge job (\d+)", r.stdout)
    assert m, r.stdout
    array_id, merge_id = m.groups()
    state = slurm_cluster.wait_state(merge_id, {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL"}, 900)
    slurm_logs = sorted((prefix.parent / "austen.parts" / "logs" / "slurm_logs").glob("*.out"))
    assert state == "COMPLETED", "\n".join(p.read_text(errors="replace")[-2000:] for p in slurm_logs)
    same_dataset(single_node, str(prefix))
    assert read_manifest(str(prefix))["executor"] == "slurm"
    script = (prefix.parent / "austen.parts" / "logs" / "launch_script.slurm").read_text().splitlines()
    for line in [
        "#SBATCH --partition=debug",
        "#SBATCH --time=00:20:00",
        "#SBATCH --account=pkmtest",
        "#SBATCH --comment=pkm-preprocess-test",
        "#SBATCH --cpus-per-task=1",
        "#SBATCH --array=0-3",
    ]:
        assert line in script, line
    # the controller's completion records (what sacct would show): four array tasks over both nodes
    records = [
        dict(w.split("=", 1) for w in line.split() if "=" in w)
        for line in (slurm_cluster.root / "log" / "jobcomp.txt").read_text().splitlines()
    ]
    tasks = [r for r in records if r.get("ArrayJobId") == array_id]
    assert sorted(r["ArrayTaskId"] for r in tasks) == ["0", "1", "2", "3"], tasks
    assert {r["JobState"] for r in tasks} == {"COMPLETED"} and {r["NodeList"] for r in tasks} == {"node1", "node2"}, (
        tasks
    )
