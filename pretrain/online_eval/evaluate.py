"""`run_online_eval(job)`: load the documents and the model, compare the runs, write the reports.
The function behind `pkm eval online` (whose CLI only parses arguments into an `OnlineEvalJob`)."""

from __future__ import annotations

import logging
import time
from pathlib import Path

from pretrain.errors import PretrainError
from pretrain.online_eval.config import OnlineEvalJob
from pretrain.online_eval.engine import RunResult

log = logging.getLogger("pkm.online_eval")


def run_online_eval(job: OnlineEvalJob) -> tuple[list[RunResult], dict]:
    """Results of every run, and the summary written to OUT/results.json (also OUT/loss_by_position.png and
    OUT/tensorboard/). Bad input (corpus, output directory, model) fails before any run starts."""
    import torch

    from data_pipeline.outputs import check_writable
    from pretrain.online_eval import report
    from pretrain.online_eval.corpus import load_corpus, tokenize
    from pretrain.online_eval.engine import compare
    from pretrain.online_eval.models import load_causal_lm

    runs = [c.validate() for c in job.runs]
    if not runs:
        raise PretrainError("online eval: no run to compare (give at least one OnlineEvalConfig)")
    if len({c.doc_start for c in runs}) > 1:  # every run reads the same token ids
        raise PretrainError("online eval: doc_start differs among the runs; the documents are tokenized once")
    check_writable(job.out)  # before the model loads and the runs take their time
    if job.threads:
        torch.set_num_threads(job.threads)
    device = job.device or ("cuda" if torch.cuda.is_available() else "cpu")
    corpus = load_corpus(job.corpus, job.json_key, job.max_docs)  # a bad corpus before the model loads
    calibration = load_corpus(job.rms_calibration, job.json_key) if job.rms_calibration else None
    t0 = time.time()
    model, tok = load_causal_lm(job.model, tokenizer=job.tokenizer, device=device, dtype=job.dtype)
    log.info(
        "loaded %s (%s, %.1fM parameters) in %.1f s",
        job.model,
        type(model).__name__,
        sum(p.numel() for p in model.parameters()) / 1e6,
        time.time() - t0,
    )
    vocab = model.get_input_embeddings().num_embeddings
    docs = tokenize(corpus, tok, runs[0].doc_start, job.max_tokens, vocab)
    if calibration is not None:
        calibration = tokenize(calibration, tok, runs[0].doc_start, job.max_tokens, vocab)
    log.info("%d documents, %d tokens; %d runs", len(docs), sum(d.n_scored for d in docs), len(runs))
    results = compare(model, docs, runs, interleave=job.interleave, calibration=calibration, progress=job.progress)
    out = Path(job.out)
    meta = dict(
        model=job.model,
        corpus=job.corpus,
        device=device,
        threads=torch.get_num_threads(),
        date=time.strftime("%Y-%m-%d %H:%M:%S"),
        interleave=job.interleave,
    )
    summary = report.write_json(out / "results.json", results, meta)
    report.plot(out / "loss_by_position.png", results, title=f"{job.model} on {job.corpus}")
    report.tensorboard(out / "tensorboard", results)
    return results, summary
