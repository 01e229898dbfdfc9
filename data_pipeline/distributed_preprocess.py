"""`pkm data preprocess --executor local|slurm`: the dataset `preprocess()` makes, built by a
datatrove pipeline over many local processes or a SLURM job array, then merged into one.

    PREFIX.parts/plan.json           what is being made (sources with sizes and mtimes, tokenizer
                                     and its hash, options, tasks); a rerun with the same plan
                                     resumes, any other plan starts over
    PREFIX.parts/part-XXXXX.bin/.idx input source XXXXX (0-based, input order), tokenized
    PREFIX.parts/part-XXXXX.json     its tally (documents, tokens, skipped records), written last
    PREFIX.parts/logs/               datatrove's logging dir: completions/, logs/task_XXXXX.log, stats/
    PREFIX.parts/merge-logs/         (slurm) the same for the merge job

Task r of T tokenizes sources r, r+T, r+2T, ... (datatrove's file sharding) with our readers and
tokenizer, one part per source, so the parts and their order do not depend on T; the merge adds
the parts in input order with megatron-core's `IndexedDatasetBuilder.add_index` (the .bin is
copied in blocks, only the index is held in memory), which gives a dataset byte-identical to the
single-node path. A rerun redoes only the tasks datatrove has not marked complete, and inside
them only the parts not yet written (parts are published by rename, their tally last). After a
successful merge the parts and the plan are deleted; datatrove's logs stay.
A single huge file is one part (one task): split such a corpus into many files to spread it.
"""

from __future__ import annotations

import contextlib
import gc
import glob
import json
import logging
import os
import shlex
import shutil
import sys
import time

import numpy as np
from datatrove.executor import LocalPipelineExecutor, SlurmPipelineExecutor
from datatrove.pipeline.base import PipelineStep

from data_pipeline.errors import DataError
from data_pipeline.preprocess import (
    ChunkWriter,
    Tally,
    build_manifest,
    check_options,
    check_tokenizer,
    dataset_dtype,
    dataset_paths,
    init_worker,
    new_builder,
    prepare_output_dir,
    process_chunk,
    publish,
    read_versioned_json,
    remove_leftovers,
    run_options,
)
from data_pipeline.readers import expand_inputs, iter_chunks
from data_pipeline.slurm_job import SlurmJob
from data_pipeline.tokenizer import Tokenizer, load_tokenizer

log = logging.getLogger("pkm.data")

PLAN_FORMAT = "pkm-preprocess-plan/1"
EXECUTORS = ("local", "slurm")
PART_CHUNK_BYTES = 1 << 20  # chunks are tokenized in the task's own process; the size does not change the output


def parts_dir(prefix: str) -> str:
    return prefix + ".parts"


def part_prefix(prefix: str, index: int) -> str:
    return os.path.join(parts_dir(prefix), f"part-{index:05d}")


def _plan_path(prefix: str) -> str:
    return os.path.join(parts_dir(prefix), "plan.json")


def _source_state(src: str):
    """What tells a changed input file apart (size, mtime); None for dataset directories and specs."""
    if os.path.isfile(src):
        st = os.stat(src)
        return [st.st_size, st.st_mtime_ns]
    return None


def make_plan(
    inputs,
    output_prefix: str,
    tok: Tokenizer,
    tasks: int,
    on_error: str,
    json_key: str,
    text_mode: str,
    family: str,
    max_sentence_tokens: int,
) -> dict:
    sources = expand_inputs(list(inputs))
    return {
        "format": PLAN_FORMAT,
        "output": os.path.abspath(output_prefix),
        "sources": [s if s.startswith("datasets:") else os.path.abspath(s) for s in sources],
        "source_states": [_source_state(s) for s in sources],
        "tokenizer": tok.path,
        "tokenizer_sha256": tok.identity["sha256"],
        "dtype": np.dtype(dataset_dtype(tok)).name,
        "family": family,
        "max_sentence_tokens": max_sentence_tokens,
        "options": run_options(json_key, text_mode, on_error, family, max_sentence_tokens),
        "tasks": tasks,
    }


def prepare_parts(plan: dict) -> bool:
    """Resume when PREFIX.parts holds the same plan (True); otherwise start it afresh (False)."""
    d = parts_dir(plan["output"])
    try:
        with open(_plan_path(plan["output"]), encoding="utf-8") as f:
            old = json.load(f)
        if {k: v for k, v in old.items() if k != "created"} == plan:
            return True
    except (OSError, ValueError):
        pass
    shutil.rmtree(d, ignore_errors=True)
    os.makedirs(d)
    tmp = _plan_path(plan["output"]) + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump({**plan, "created": time.time()}, f, indent=1)
    os.replace(tmp, _plan_path(plan["output"]))
    return False


def read_plan(prefix: str) -> dict:
    return read_versioned_json(
        _plan_path(prefix), PLAN_FORMAT, "plan", "no readable preprocessing plan ({}); run `pkm data preprocess` again"
    )


def _part_tally(pp: str) -> dict | None:
    """The part's tally when the part is complete (its .bin/.idx have the sizes it recorded), else None."""
    try:
        with open(pp + ".json", encoding="utf-8") as f:
            part = json.load(f)
    except (OSError, ValueError):
        return None
    p = dataset_paths(pp)
    ok = all(os.path.isfile(p[k]) and os.path.getsize(p[k]) == part["files"][k] for k in ("bin", "idx"))
    return part if ok else None


def tokenize_part(plan: dict, index: int) -> None:
    """Tokenize source `index` into part-XXXXX.{bin,idx} + .json (skipped when already complete)."""
    pp = part_prefix(plan["output"], index)
    if _part_tally(pp) is not None:
        return
    src = plan["sources"][index]
    remove_leftovers(pp)
    tok = load_tokenizer(plan["tokenizer"])
    if tok.identity["sha256"] != plan["tokenizer_sha256"]:
        raise DataError(
            f"tokenizer {plan['tokenizer']} changed since this preprocessing run started "
            f"(sha256 {tok.identity['sha256'][:12]}, planned {plan['tokenizer_sha256'][:12]})"
        )
    opts = plan["options"]
    init_worker(tok, plan["family"], plan["dtype"], plan["max_sentence_tokens"])
    tmp_prefix = f"{pp}.tmp{os.getpid()}"
    tmp = dataset_paths(tmp_prefix)
    builder = new_builder(tmp["bin"], plan["dtype"])
    tally = Tally([src])
    writer = ChunkWriter(builder, tally, opts["on_error"])
    t0 = time.time()
    try:
        for chunk in iter_chunks(
            [src], json_key=opts["json_key"], text_mode=opts["text_mode"], chunk_bytes=PART_CHUNK_BYTES
        ):
            writer.add(process_chunk(chunk))
        builder.finalize(tmp["idx"])
    except BaseException:
        builder.data_file.close()
        remove_leftovers(pp)
        raise
    part = {
        "source": src,
        "index": index,
        "tally": tally.to_json(),
        "elapsed_s": round(time.time() - t0, 3),
        "files": {"bin": os.path.getsize(tmp["bin"]), "idx": os.path.getsize(tmp["idx"])},
    }
    final = dataset_paths(pp)
    os.replace(tmp["bin"], final["bin"])
    os.replace(tmp["idx"], final["idx"])
    with open(tmp_prefix + ".json", "w", encoding="utf-8") as f:
        json.dump(part, f)
    os.replace(tmp_prefix + ".json", pp + ".json")  # last: the part counts as done from here
    log.info("part %d (%s): %d documents, %d tokens", index, src, tally.total("documents"), tally.total("tokens"))


def merge_parts(prefix: str, **extra) -> dict:
    """Concatenate the parts in input order into PREFIX.{bin,idx} + manifest, publish them atomically,
    then delete the parts and the plan. Returns the manifest."""
    prefix = os.path.abspath(prefix)
    plan = read_plan(prefix)
    parts = []
    for i, src in enumerate(plan["sources"]):
        part = _part_tally(part_prefix(prefix, i))
        if part is None:
            raise DataError(
                f"{prefix}: part {i} ({src}) is not finished; run the same command again to redo the unfinished tasks"
            )
        parts.append(part)
    tok = load_tokenizer(plan["tokenizer"])
    remove_leftovers(prefix)
    tmp_prefix = f"{prefix}.tmp{os.getpid()}"
    tmp = dataset_paths(tmp_prefix)
    t0 = time.time()
    builder = new_builder(tmp["bin"], plan["dtype"])
    tally = Tally(plan["sources"])
    # add_index runs gc.collect() per part: over torch's and megatron's objects that is ~0.4 s each
    # (hours for thousands of parts); frozen, they are not scanned.
    gc.freeze()
    try:
        for i, part in enumerate(parts):
            part_tally = Tally.from_json(part["tally"])
            tally.add(part_tally)
            if part_tally.total("documents"):  # an all-bad source leaves an empty part
                builder.add_index(part_prefix(prefix, i))
        builder.finalize(tmp["idx"])
    except BaseException:
        builder.data_file.close()
        remove_leftovers(prefix)
        raise
    finally:
        gc.unfreeze()
    merge_s = time.time() - t0
    if tally.total("documents") == 0:
        remove_leftovers(prefix)
        raise DataError(
            f"{prefix}: no documents in {', '.join(plan['sources'])} ({tally.skipped_total} bad records skipped)"
        )
    with open(_plan_path(prefix), encoding="utf-8") as f:
        started = json.load(f)["created"]
    files = {"bin": os.path.getsize(tmp["bin"]), "idx": os.path.getsize(tmp["idx"])}
    manifest = build_manifest(
        tally,
        tok,
        plan["family"],
        plan["dtype"],
        plan["options"],
        files,
        time.time() - started,
        tasks=plan["tasks"],
        merge_s=round(merge_s, 3),
        **extra,
    )
    publish(tmp_prefix, prefix, manifest)
    for path in glob.glob(glob.escape(os.path.join(parts_dir(prefix), "part-")) + "*"):
        os.remove(path)
    os.remove(_plan_path(prefix))
    log.info(
        "%s: merged %d parts: %d documents, %d tokens, %d skipped",
        prefix,
        len(parts),
        manifest["documents"],
        manifest["tokens"],
        manifest["skipped_total"],
    )
    return manifest


class TokenizeParts(PipelineStep):
    """The datatrove step: task `rank` of `world_size` tokenizes its share of the sources into parts
    (our readers and tokenizer, so records, file:line errors and --on-error behave as in one process)."""

    name = "tokenize into megatron indexed parts"
    type = "🔢 - TOKENIZER"

    def __init__(self, plan: dict):
        super().__init__()
        self.plan = plan

    def run(self, data=None, rank: int = 0, world_size: int = 1):
        for index in range(rank, len(self.plan["sources"]), world_size):
            with self.track_time(unit="source"):
                tokenize_part(self.plan, index)
            self.stat_update("sources")


class MergeParts(PipelineStep):
    """The SLURM merge job's one step (the local executor merges in the calling process)."""

    name = "merge parts into one indexed dataset"
    type = "🔗 - MERGE"

    def __init__(self, prefix: str):
        super().__init__()
        self.prefix = prefix

    def run(self, data=None, rank: int = 0, world_size: int = 1):
        merge_parts(self.prefix, executor="slurm")


@contextlib.contextmanager
def _datatrove_console_off():
    """datatrove logs each task (and its tracebacks) to the console through loguru; keep that in its
    per-task log files (PREFIX.parts/logs/logs/) so the terminal shows our one-line errors only.
    Forked tasks inherit the swapped stderr."""
    from datatrove.utils.logging import setup_default_logger

    real = sys.stderr
    with open(os.devnull, "w") as null:
        sys.stderr = null
        setup_default_logger()
        try:
            yield
        finally:
            sys.stderr = real
            setup_default_logger()


def run_local(plan: dict, workers: int) -> dict:
    """Run the plan's tasks on this machine, `workers` at a time, then merge. Returns the manifest."""
    prefix = plan["output"]
    resumed = prepare_parts(plan)
    ex = LocalPipelineExecutor(
        [TokenizeParts(plan)],
        tasks=plan["tasks"],
        workers=min(workers, plan["tasks"]),
        logging_dir=os.path.join(parts_dir(prefix), "logs"),
        start_method="fork",
    )
    left = len(ex.get_incomplete_ranks())
    log.info(
        "%s: %s %d of %d tasks, %d at a time (datatrove logs in %s)",
        prefix,
        "resuming:" if resumed else "running",
        left,
        plan["tasks"],
        ex.workers,
        ex.logging_dir.path,
    )
    # Import megatron (and torch) once here: the forked tasks share it instead of each importing it
    # again; frozen objects keep their garbage collector from copying the shared pages.
    import megatron.core.datasets.indexed_dataset  # noqa: F401

    gc.freeze()
    try:
        with _datatrove_console_off():
            ex.run()
    finally:
        gc.unfreeze()
    return merge_parts(prefix, executor="local", workers=workers)


class _SlurmExecutor(SlurmPipelineExecutor):
    """datatrove's SLURM executor with the job described like `pkm launch slurm` describes one: our
    time/partition/account/extra lines replace its own (it would write "--partition=None" and
    "--mem-per-cpu=2G", and a qos the cluster may not have); no separate stats-merging job (our
    manifest is the summary)."""

    def __init__(self, job: SlurmJob, **kw):
        self.job = job
        super().__init__(
            time=job.time or "", partition=job.partition or "", cpus_per_task=job.cpus_per_task or 1, qos=None, **kw
        )

    def get_sbatch_args(self, max_array: int = 1) -> dict:
        args = super().get_sbatch_args(max_array)
        for key in ("partition", "time", "qos", "mem-per-cpu"):
            args.pop(key, None)
        return args

    def get_launch_file_contents(self, sbatch_args: dict, run_script: str) -> str:
        text = super().get_launch_file_contents(sbatch_args, run_script)
        ours = "".join(f"#SBATCH {opt}\n" for opt in self.job.sbatch_options())
        return text.replace("#!/bin/bash\n", "#!/bin/bash\n" + ours, 1)

    def launch_merge_stats(self):
        pass


def slurm_executors(plan: dict, job: SlurmJob, workers: int) -> tuple[_SlurmExecutor, _SlurmExecutor]:
    """The tokenizing job array and the merge job that depends on it (afterok)."""
    prefix = plan["output"]
    name = job.job_name or f"pkm-preprocess-{os.path.basename(prefix)}"
    # the job runs datatrove's `launch_pickled_pipeline`, installed next to this interpreter
    env = f'export PATH={shlex.quote(os.path.dirname(os.path.abspath(sys.executable)))}:"$PATH"'
    common = dict(job=job, env_command=env, requeue_signals=None)
    tokenize = _SlurmExecutor(
        pipeline=[TokenizeParts(plan)],
        tasks=plan["tasks"],
        workers=workers,
        job_name=name,
        logging_dir=os.path.join(parts_dir(prefix), "logs"),
        **common,
    )
    merge = _SlurmExecutor(
        pipeline=[MergeParts(prefix)],
        tasks=1,
        job_name=name + "-merge",
        depends=tokenize,
        logging_dir=os.path.join(parts_dir(prefix), "merge-logs"),
        sbatch_args={"kill-on-invalid-dep": "yes"},
        **common,
    )
    return tokenize, merge


def submit_slurm(plan: dict, job: SlurmJob, workers: int) -> dict:
    """Submit the job array (only the unfinished tasks) and the merge job; returns their ids and paths."""
    import subprocess

    if shutil.which("sbatch") is None:
        raise DataError("--executor slurm: 'sbatch' was not found on PATH (run this on a SLURM login node)")
    resumed = prepare_parts(plan)
    tokenize, merge = slurm_executors(plan, job, workers)
    left = len(tokenize.get_incomplete_ranks())
    try:
        with _datatrove_console_off():
            merge.run()  # submits its dependency (the job array) first
    except subprocess.CalledProcessError as e:
        raise DataError(f"sbatch rejected the preprocessing job (exit {e.returncode}); see its message above") from None
    return {
        "resumed": resumed,
        "tasks_left": left,
        "array_job": tokenize.job_id,
        "merge_job": merge.job_id,
        "logs": tokenize.logging_dir.path,
        "slurm_logs": tokenize.slurm_logs_folder,
    }


def check_run(tasks: int, workers: int, executor: str) -> None:
    if executor not in EXECUTORS:
        raise DataError(f"--executor {executor!r}: expected one of {', '.join(EXECUTORS)}")
    if tasks < 1:
        raise DataError(f"--tasks {tasks}: expected 1 or more")
    if workers < 1 and not (executor == "slurm" and workers == -1):
        raise DataError(f"--workers {workers}: expected 1 or more with --executor {executor}")


def preprocess_distributed(
    inputs,
    output_prefix: str,
    tokenizer: Tokenizer | str | None = None,
    *,
    executor: str,
    tasks: int,
    workers: int,
    job: SlurmJob | None = None,
    on_error: str = "fail",
    json_key: str = "text",
    text_mode: str = "file",
    family: str = "gpt",
    max_sentence_tokens: int = 256,
) -> dict:
    """`preprocess()` on datatrove: executor "local" runs the tasks here and returns the manifest;
    "slurm" submits them (workers = array tasks at a time, -1 = no limit) and returns the job ids."""
    check_run(tasks, workers, executor)
    for problem in job.problems() if job is not None else []:
        raise DataError(problem)
    check_options(on_error, family, 0)
    tok = tokenizer if isinstance(tokenizer, Tokenizer) else load_tokenizer(tokenizer)
    check_tokenizer(tok, family)
    plan = make_plan(inputs, output_prefix, tok, tasks, on_error, json_key, text_mode, family, max_sentence_tokens)
    prepare_output_dir(output_prefix)
    if executor == "local":
        return run_local(plan, workers)
    return submit_slurm(plan, job or SlurmJob(), workers)
