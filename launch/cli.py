"""`pkm launch ...`: start training jobs on clusters (SLURM batch jobs, multi-node torchrun).

Light on purpose: no torch, no model code; it checks the config, renders commands and runs them.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from pathlib import Path

from data_pipeline.argtypes import port, positive_int


def _add_training_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, help="the run's YAML config (pretrain.config.RunConfig)")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides, as for `pkm pretrain`")
    p.add_argument(
        "--max-restarts",
        type=int,
        default=1,
        help="torchrun restarts of the worker group after a worker fails (default 1); "
        "the restarted group resumes from the latest checkpoint",
    )
    p.add_argument("--dry-run", action="store_true", help="print what would run; start nothing")


def register(subparsers: argparse._SubParsersAction) -> None:
    launch = subparsers.add_parser("launch", help="start a training job on a cluster (SLURM, torchrun)")
    sub = launch.add_subparsers(dest="launch_command", required=True, metavar="<launcher>")

    s = sub.add_parser(
        "slurm",
        help="render an sbatch script into the run directory and submit it",
        description="Submit `pkm pretrain` as a SLURM batch job: srun starts one torchrun per "
        "node with c10d rendezvous on the first node. On SIGUSR1 (sent "
        "--signal-seconds before the time limit) the trainer saves a checkpoint "
        "and the job requeues itself, resuming from it.",
    )
    s.add_argument("--nodes", type=int, required=True)
    s.add_argument("--gpus-per-node", type=int, default=0, help="one worker per GPU; 0 = a CPU job (gloo)")
    s.add_argument("--procs-per-node", type=int, default=1, help="workers per node of a CPU job (default 1)")
    s.add_argument("--cpus-per-task", type=int, default=None, help="cores per node's task (default: one per worker)")
    s.add_argument("--time", default=None, help="time limit, as sbatch --time (e.g. 2-00:00:00)")
    s.add_argument("--partition", default=None)
    s.add_argument("--account", default=None)
    s.add_argument("--job-name", default=None, help="default: pkm-<run directory name>")
    s.add_argument(
        "--signal-seconds",
        type=int,
        default=300,
        help="send SIGUSR1 this many seconds before the time limit (default 300): time to save",
    )
    s.add_argument("--max-requeues", type=int, default=20, help="stop requeueing after this many (default 20)")
    s.add_argument(
        "--sbatch",
        action="append",
        default=[],
        metavar="OPTION",
        help="an extra sbatch option for the script, e.g. --sbatch=--qos=high (repeatable)",
    )
    _add_training_args(s)
    s.set_defaults(func=cmd_slurm)

    t = sub.add_parser(
        "torchrun",
        help="print and run the torchrun command for one node (clusters without SLURM)",
        description="Run this on every node with the same --rdzv-endpoint and its own "
        "--node-rank; node rank 0 hosts the rendezvous store at that endpoint.",
    )
    t.add_argument("--nnodes", type=int, required=True)
    t.add_argument(
        "--node-rank",
        type=int,
        required=True,
        help="this node's rank; node rank 0 hosts the rendezvous store (c10d numbers the workers itself)",
    )
    t.add_argument(
        "--rdzv-endpoint",
        required=True,
        metavar="HOST:PORT",
        help="an address of node rank 0 that every node can reach, and a free port there",
    )
    t.add_argument("--nproc-per-node", type=int, default=1, help="workers on this node (one per GPU)")
    t.add_argument(
        "--rdzv-id", default=None, help="the job's id, the same on every node (default: from the run directory)"
    )
    t.add_argument(
        "--shutdown-timeout",
        type=positive_int,
        default=120,
        help="seconds workers get to save a checkpoint after SIGTERM/SIGUSR1 (default 120)",
    )
    _add_training_args(t)
    t.set_defaults(func=cmd_torchrun)

    h = sub.add_parser("deepspeed", help="write a DeepSpeed hostfile and print (or run) the deepspeed launcher command")
    h.add_argument("--hosts", required=True, help="comma-separated host names, first = master")
    h.add_argument("--slots", type=int, required=True, help="workers (GPUs) per host")
    h.add_argument("--master-port", type=port, default=29500)
    h.add_argument("--run", action="store_true", help="run the command after printing it")
    _add_training_args(h)
    h.set_defaults(func=cmd_deepspeed)


def _print_command(argv: list[str], env: dict[str, str] | None = None) -> None:
    words = [f"{k}={shlex.quote(v)}" for k, v in (env or {}).items()] + [shlex.quote(a) for a in argv]
    print(" ".join(words), flush=True)


def cmd_slurm(args: argparse.Namespace) -> int:
    from launch import slurm
    from launch.training import plan_training, venv_python

    if not args.dry_run:
        slurm.find_sbatch()  # fail before anything else when there is no SLURM here
    opts = slurm.SlurmOptions(
        nodes=args.nodes,
        gpus_per_node=args.gpus_per_node,
        procs_per_node=args.procs_per_node,
        cpus_per_task=args.cpus_per_task,
        time=args.time,
        partition=args.partition,
        account=args.account,
        job_name=args.job_name,
        signal_seconds=args.signal_seconds,
        max_restarts=args.max_restarts,
        max_requeues=args.max_requeues,
        sbatch_lines=args.sbatch,
    )
    opts.check()
    workdir = Path.cwd()
    job = plan_training(args.config, args.overrides, args.nodes, opts.workers_per_node, workdir)
    text = slurm.render_sbatch(opts, job.entry, job.run_dir, venv_python(), workdir)
    if args.dry_run:
        print(text, end="")
        print(f"# dry run: would write {slurm.script_path(job.run_dir)} and submit it with sbatch", file=sys.stderr)
        return 0
    path = slurm.write_script(text, job.run_dir)
    job_id = slurm.submit(path)
    log = slurm.job_log(job.run_dir, opts.job_name_for(job.run_dir), job_id)
    print(
        f"Submitted SLURM job {job_id}: {args.nodes} node(s) x {opts.workers_per_node} worker(s), "
        f"tensor parallel {job.tensor_parallel}, data parallel {job.data_parallel}"
    )
    print(f"  script:      {path}")
    print(f"  SLURM log:   {log}")
    print(f"  trainer log: {job.run_dir / 'logs'}")
    print(f"  TensorBoard: {job.run_dir / 'tensorboard'}")
    print(f"  watch with:  squeue -j {job_id}; tail -f {log}")
    return 0


def cmd_torchrun(args: argparse.Namespace) -> int:
    from launch.errors import LaunchError
    from launch.torchrun import TORCHRUN_ENV, TorchrunOptions, check_endpoint, torchrun_argv
    from launch.training import plan_training, venv_python

    check_endpoint(args.rdzv_endpoint)
    if args.nnodes < 1:
        raise LaunchError(f"--nnodes must be at least 1, got {args.nnodes}")
    if not 0 <= args.node_rank < args.nnodes:
        raise LaunchError(f"--node-rank must be 0..{args.nnodes - 1} for --nnodes {args.nnodes}, got {args.node_rank}")
    job = plan_training(args.config, args.overrides, args.nnodes, args.nproc_per_node)
    opts = TorchrunOptions(
        nnodes=args.nnodes,
        nproc_per_node=args.nproc_per_node,
        rdzv_endpoint=args.rdzv_endpoint,
        rdzv_id=args.rdzv_id or f"pkm-{job.run_dir.name}",
        max_restarts=args.max_restarts,
        is_host=args.node_rank == 0,
        shutdown_timeout=args.shutdown_timeout,
    )
    argv = torchrun_argv(venv_python(), opts, job.entry)
    _print_command(argv, TORCHRUN_ENV)
    if args.dry_run:
        return 0
    os.execve(
        argv[0], argv, {**os.environ, **TORCHRUN_ENV}
    )  # torchrun takes this process's place: signals reach it directly


def cmd_deepspeed(args: argparse.Namespace) -> int:
    from launch import deepspeed
    from launch.training import plan_training, venv_python

    hosts = [h.strip() for h in args.hosts.split(",") if h.strip()]
    text = deepspeed.hostfile_text(hosts, args.slots)
    job = plan_training(args.config, args.overrides, len(hosts), args.slots)
    hostfile = deepspeed.hostfile_path(job.run_dir)
    argv = deepspeed.deepspeed_argv(venv_python(), hostfile, hosts[0], args.master_port, job.entry)
    if args.dry_run:
        print(text, end="")
    else:
        deepspeed.write_hostfile(text, hostfile)
        print(f"# wrote {hostfile}", file=sys.stderr)
    _print_command(argv)
    if args.run and not args.dry_run:
        os.execv(argv[0], argv)
    return 0
