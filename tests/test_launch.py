"""`pkm launch`: sbatch rendering, torchrun/deepspeed commands and the checks made before submitting.

Fast (no daemons, no torch in the launcher); the real runs are in test_launch_slurm.py and
test_launch_dist.py.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from launch.errors import LaunchError
from launch.slurm import SlurmOptions, render_sbatch, shell_word
from launch.torchrun import TorchrunOptions, torchrun_argv
from launch.training import PREEMPTED_EXIT_CODE, Entry, plan_training
from tests.conftest import PY, ROOT, TINY_GPT, assert_user_error, run_pkm

# `pkm launch torchrun` as node 0 of two; the tests add the endpoint and the config.
TORCHRUN_TWO_NODES = ["launch", "torchrun", "--nnodes", "2", "--node-rank", "0"]


def pkm(*args: str, cwd: Path = ROOT, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([PY, "-m", "pkm", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=120)


def write_config(tmp_path: Path, tp: int = 1, mbs: int = 4, gbs: int = 8) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text(
        f"run_dir: {tmp_path / 'run'}\nparallel:\n  tensor_parallel: {tp}\n"
        f"train:\n  micro_batch_size: {mbs}\n  global_batch_size: {gbs}\n"
    )
    return path


def test_plan_adds_resume_and_absolute_paths(tmp_path):
    job = plan_training(
        "run.yaml", ["train.train_steps=7"], nodes=2, procs_per_node=1, workdir=write_config(tmp_path).parent
    )
    assert job.world_size == 2 and job.data_parallel == 2 and job.tensor_parallel == 1
    assert job.run_dir == tmp_path / "run"
    assert job.entry.args == (
        "pretrain",
        "--config",
        str(tmp_path / "run.yaml"),
        "train.train_steps=7",
        "checkpoint.resume=auto",
    )
    # the user's own resume choice is kept
    job = plan_training(write_config(tmp_path), ["checkpoint.resume=/ckpt/step_5"], nodes=1, procs_per_node=1)
    assert "checkpoint.resume=auto" not in job.entry.args


@pytest.mark.parametrize(
    "nodes,per_node,tp,mbs,gbs,needle",
    [
        (3, 1, 2, 4, 8, "parallel.tensor_parallel=2 does not divide"),
        (1, 3, 2, 4, 8, "3 ranks"),
        (4, 1, 1, 4, 8, "train.global_batch_size=8 is not a multiple of micro_batch_size x dp = 4 x 4"),
    ],
)
def test_plan_rejects_world_sizes_the_config_cannot_use(tmp_path, nodes, per_node, tp, mbs, gbs, needle):
    with pytest.raises(LaunchError, match=needle.replace(".", r"\.").replace("=", "=")):
        plan_training(write_config(tmp_path, tp, mbs, gbs), [], nodes=nodes, procs_per_node=per_node)


def test_plan_rejects_a_config_that_does_not_load(tmp_path):
    with pytest.raises(LaunchError, match=r"does not load.*unknown config key 'train.trian_steps'.*train_steps"):
        plan_training(write_config(tmp_path), ["train.trian_steps=3"], nodes=1, procs_per_node=1)
    with pytest.raises(LaunchError, match="does not exist"):
        plan_training(tmp_path / "missing.yaml", [], nodes=1, procs_per_node=1)


def _script(tmp_path, **kw) -> str:
    entry = Entry("pkm", ("pretrain", "--config", "/cfg/a.yaml", "checkpoint.resume=auto"))
    return render_sbatch(SlurmOptions(**kw), entry, tmp_path / "run", "/venv/bin/python", tmp_path)


def test_sbatch_script_shape(tmp_path):
    text = _script(
        tmp_path,
        nodes=2,
        signal_seconds=90,
        max_restarts=2,
        time="01:00:00",
        partition="gpu",
        sbatch_lines=["--qos=high"],
    )
    for line in [
        "#SBATCH --nodes=2",
        "#SBATCH --ntasks-per-node=1",
        "#SBATCH --cpus-per-task=1",
        "#SBATCH --time=01:00:00",
        "#SBATCH --partition=gpu",
        "#SBATCH --qos=high",
        "#SBATCH --requeue",
        "#SBATCH --signal=B:USR1@90",
        f"#SBATCH --output={tmp_path}/run/slurm/%x-%j.out",
        f"#SBATCH --chdir={tmp_path}",
        "#SBATCH --job-name=pkm-run",
        "PYTHON=/venv/bin/python",
        "PREEMPTED_EXIT_CODE=75",
        'scontrol requeue "$SLURM_JOB_ID"',
        '"--rdzv-endpoint=${rdzv_addr}:${rdzv_port}"',
        '"--nnodes=${SLURM_JOB_NUM_NODES}"',
        "--max-restarts=2",
        "--signals-to-handle=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1",
        "--shutdown-timeout=90",
        "export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1",
        "-m pkm pretrain --config /cfg/a.yaml checkpoint.resume=auto",
    ]:
        assert line in text, line
    assert "--gpus-per-node" not in text
    assert shutil.which("bash")
    check = subprocess.run(["bash", "-n"], input=text, text=True, capture_output=True)
    assert check.returncode == 0, check.stderr


def test_sbatch_gpu_job(tmp_path):
    text = _script(tmp_path, nodes=4, gpus_per_node=8, cpus_per_task=64)
    assert "#SBATCH --gpus-per-node=8" in text and "--nproc-per-node=8" in text and "#SBATCH --cpus-per-task=64" in text
    with pytest.raises(LaunchError, match="one worker per GPU"):
        _script(tmp_path, nodes=1, gpus_per_node=2, procs_per_node=3)
    with pytest.raises(LaunchError, match="65535"):
        _script(tmp_path, nodes=1, signal_seconds=70000)
    with pytest.raises(LaunchError, match="not an sbatch option"):
        _script(tmp_path, nodes=1, sbatch_lines=["qos=high"])


def test_shell_word_keeps_only_marked_variables_live():
    assert shell_word("a b") == "'a b'"
    assert shell_word("x=$HOME") == "'x=$HOME'"
    assert shell_word('--rdzv-id=pkm-"$\0JOB_ID\0') == '"--rdzv-id=pkm-\\"\\$${SLURM_JOB_ID}"'


def test_torchrun_argv():
    entry = Entry("pkm", ("pretrain", "--config", "c.yaml"))
    argv = torchrun_argv(
        "/venv/bin/python",
        TorchrunOptions(nnodes=2, nproc_per_node=4, rdzv_endpoint="10.0.0.1:29400", rdzv_id="j1", is_host=False),
        entry,
    )
    assert argv[:3] == ["/venv/bin/python", "-m", "torch.distributed.run"]
    assert argv[-5:] == ["-m", "pkm", "pretrain", "--config", "c.yaml"]
    for opt in [
        "--nnodes=2",
        "--nproc-per-node=4",
        "--rdzv-backend=c10d",
        "--rdzv-endpoint=10.0.0.1:29400",
        "--rdzv-id=j1",
        "--max-restarts=1",
        "--rdzv-conf=is_host=0",
    ]:
        assert opt in argv


def test_preempted_exit_code_matches_the_trainer():
    trainer = (ROOT / "pretrain" / "trainer.py").read_text()  # read, not imported: it pulls in torch
    assert f"PREEMPTED_EXIT_CODE = {PREEMPTED_EXIT_CODE}" in trainer


def test_launch_imports_no_torch():
    code = (
        "import sys, launch.cli, launch.slurm, launch.torchrun, launch.deepspeed, launch.training\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'megatron', 'deepspeed', 'model'))\n"
        "assert not bad, bad"
    )
    proc = subprocess.run([PY, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


# --- through the `pkm` command line -------------------------------------------------------------


def test_cli_slurm_dry_run_prints_the_script_and_writes_nothing(tmp_path):
    proc = pkm("launch", "slurm", "--nodes", "2", "--config", str(TINY_GPT), f"run_dir={tmp_path / 'r'}", "--dry-run")
    assert proc.returncode == 0, proc.stderr
    assert "#SBATCH --nodes=2" in proc.stdout and f"PYTHON={PY}" in proc.stdout
    assert f"--config {TINY_GPT} run_dir={tmp_path / 'r'} checkpoint.resume=auto" in proc.stdout
    assert not (tmp_path / "r").exists()


def test_cli_errors_are_one_line_before_submitting(tmp_path):
    env = {**os.environ, "PATH": str(Path(PY).parent)}  # no sbatch here
    proc = pkm("launch", "slurm", "--nodes", "2", "--config", str(TINY_GPT), f"run_dir={tmp_path / 'r'}", env=env)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert proc.stderr.startswith("pkm: error: 'sbatch' was not found on PATH")

    proc = pkm("launch", "slurm", "--nodes", "3", "--config", str(TINY_GPT), "parallel.tensor_parallel=2", "--dry-run")
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert "3 ranks, which parallel.tensor_parallel=2 does not divide" in proc.stderr

    proc = pkm(*TORCHRUN_TWO_NODES, "--rdzv-endpoint", "host-without-port", "--config", str(TINY_GPT), "--dry-run")
    assert proc.returncode == 2 and "HOST:PORT" in proc.stderr

    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  micro_batch_size: [1\n")
    proc = pkm("launch", "slurm", "--nodes", "1", "--config", str(bad), "--dry-run")
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert f"{bad}:3: not valid YAML" in proc.stderr


def test_cli_torchrun_dry_run_prints_the_exact_command(tmp_path):
    endpoint = ["--rdzv-endpoint", "127.0.0.1:29400", "--nproc-per-node", "1"]
    proc = pkm(*TORCHRUN_TWO_NODES, *endpoint, "--config", str(TINY_GPT), f"run_dir={tmp_path / 'r'}", "--dry-run")
    assert proc.returncode == 0, proc.stderr
    line = proc.stdout.strip()
    assert line.startswith(
        f"TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 {PY} -m torch.distributed.run --nnodes=2 "
        "--nproc-per-node=1 --rdzv-backend=c10d"
    )
    assert "--rdzv-conf=is_host=1" in line and "--rdzv-id=pkm-r" in line and "--node-rank" not in line


def test_cli_deepspeed_hostfile(tmp_path):
    proc = pkm(
        "launch",
        "deepspeed",
        "--hosts",
        "gpu1,gpu2",
        "--slots",
        "4",
        "--config",
        str(TINY_GPT),
        "train.global_batch_size=32",
        f"run_dir={tmp_path / 'r'}",
    )
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "r" / "deepspeed" / "hostfile").read_text() == "gpu1 slots=4\ngpu2 slots=4\n"
    assert (
        f"-m deepspeed.launcher.runner --hostfile={tmp_path / 'r' / 'deepspeed' / 'hostfile'} --master_addr=gpu1"
        in proc.stdout
    )
    assert "--module pkm pretrain --config" in proc.stdout


# --- the trainer's layout check, run before anything is submitted (issue #16) ------------------
# Each case is a layout `pretrain.layout.check_layout` refuses on every rank at start-up; `pkm launch`
# must refuse it on the login node, with the world size the job will have, before writing a script.
LAUNCH_LAYOUT_CASES = [
    # (id, overrides, nodes x workers per node, what the one line must name)
    (
        "memory-parallel-split",
        ["model.hidden_size=66", "model.num_attention_heads=6", "parallel.memory_parallel=all"],
        (2, 2),
        ["model.hidden_size=66", "memory-parallel size 4", "parallel.memory_parallel=all"],
    ),
    (
        "memory-parallel-dp",
        [
            "model.hidden_size=66",
            "model.num_attention_heads=6",
            "parallel.memory_parallel=dp",
            "train.micro_batch_size=2",
        ],
        (4, 1),
        ["model.hidden_size=66", "memory-parallel size 4"],
    ),
    (
        "heads-by-tp",
        ["model.hidden_size=96", "model.num_attention_heads=3", "parallel.tensor_parallel=2"],
        (2, 1),
        ["model.num_attention_heads=3", "parallel.tensor_parallel=2"],
    ),
    (
        "query-groups-by-tp",
        ["model.num_query_groups=1", "parallel.tensor_parallel=2"],
        (1, 2),
        ["model.num_query_groups=1", "parallel.tensor_parallel=2"],
    ),
    (
        "ffn-by-tp",
        ["model.ffn_hidden_size=255", "parallel.tensor_parallel=2"],
        (2, 1),
        ["model.ffn_hidden_size=255", "parallel.tensor_parallel=2"],
    ),
]


@pytest.mark.parametrize("launcher", ["slurm", "torchrun"])
@pytest.mark.parametrize(
    "overrides,shape,names", [c[1:] for c in LAUNCH_LAYOUT_CASES], ids=[c[0] for c in LAUNCH_LAYOUT_CASES]
)
def test_launch_check_refuses_layouts_the_trainer_refuses(tmp_path, launcher, overrides, shape, names):
    nodes, per_node = shape
    run_dir = tmp_path / "r"
    if launcher == "slurm":
        args = ["launch", "slurm", "--nodes", nodes, "--procs-per-node", per_node]
    else:
        args = [
            "launch",
            "torchrun",
            "--nnodes",
            nodes,
            "--node-rank",
            "0",
            "--rdzv-endpoint",
            "127.0.0.1:29400",
            "--nproc-per-node",
            per_node,
        ]
    r = run_pkm(*args, "--config", TINY_GPT, f"run_dir={run_dir}", *overrides, "--dry-run", timeout=120)
    assert_user_error(r, *names)
    assert r.stdout == "", r.stdout  # no script, no command printed
    assert not run_dir.exists()


def test_launch_check_is_the_trainers_check():
    """One check, not two copies: the launcher and the trainer call the same torch-free function."""
    import pretrain.distributed
    import pretrain.layout

    assert pretrain.distributed.check_layout is pretrain.layout.check_layout


def test_launch_check_accepts_a_layout_the_trainer_takes(tmp_path):
    """The same model split TP2 x DP2 with hidden 64 over 4 ranks is fine: the check is not too strict."""
    r = run_pkm(
        "launch",
        "slurm",
        "--nodes",
        2,
        "--procs-per-node",
        2,
        "--config",
        TINY_GPT,
        f"run_dir={tmp_path / 'r'}",
        "parallel.tensor_parallel=2",
        "parallel.memory_parallel=all",
        "train.micro_batch_size=4",
        "--dry-run",
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
