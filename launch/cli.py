"""`pkm launch ...`: start training jobs on clusters (SLURM batch jobs, multi-node torchrun).

Light on purpose: no torch, no model code; it renders and runs commands.
"""
from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    launch = subparsers.add_parser("launch", help="start a training job on a cluster (SLURM, torchrun)")
    launch.add_subparsers(dest="launch_command", required=True, metavar="<launcher>")
