"""What people see of a long command (`msa demo`): one line per stage and a progress bar over the epochs on
the terminal; everything else (Prefect, Ray and its workers, MLflow, warnings) goes to a log file.

Flows announce their stages with ``stage()`` (logger ``msa.stages``); the epochs come from
``msa.runtime.ray_train.EPOCH_LOG``. Without ``divert_to_log()`` nobody shows either, and the output is what
the libraries print.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from pathlib import Path
from typing import TextIO

STAGES = logging.getLogger("msa.stages")


def stage(message: str) -> None:
    STAGES.info(message)


class _Terminal(logging.Handler):
    """Stage records as ``[mm:ss] message`` lines; epoch records as one tqdm bar, drawn once."""

    def __init__(self, stream: TextIO):
        super().__init__()
        self.stream, self.started, self.bar = stream, time.monotonic(), None

    def emit(self, record: logging.LogRecord) -> None:
        metrics = getattr(record, "epoch_metrics", None)
        if metrics is None:
            self.close_bar()
            minutes, seconds = divmod(int(time.monotonic() - self.started), 60)
            print(f"[{minutes:02d}:{seconds:02d}] {record.getMessage()}", file=self.stream, flush=True)
            return
        done = int(metrics["epoch"]) + 1
        if self.bar is None:  # drawn from the first finished epoch on (a resumed run starts past 0)
            from tqdm import tqdm

            self.bar = tqdm(total=record.epochs, initial=done - 1, file=self.stream, ascii=True, mininterval=0,
                            delay=1e-9, bar_format="        epoch {n_fmt}/{total_fmt} |{bar:30}| {desc}")
        self.bar.set_description_str(f"loss {metrics['train_loss']:.3f}, val mR {metrics['val_mR']:.2f}",
                                     refresh=False)
        self.bar.update(done - self.bar.n)

    def close_bar(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def log_path(command: str) -> Path:
    from msa.paths import LOCAL_STATE

    return LOCAL_STATE / "logs" / f"{command}-{time.strftime('%Y%m%d-%H%M%S')}.log"


def divert_to_log(log_file: Path, json_mode: bool = False) -> tuple[TextIO, TextIO]:
    """For the rest of this process, point file descriptors 1 and 2 (its output and that of everything it
    starts: Prefect's server, Ray, the workers' lines Ray forwards late, exit-time messages) at ``log_file``.

    Returns the terminal's stdout and the stream for people: the terminal's stdout, or its stderr with
    ``json_mode`` (stdout then holds one JSON document). Stages and epochs show there and in the log.
    """
    from msa.runtime.ray_train import EPOCH_LOG

    log_file.parent.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    out = os.fdopen(os.dup(1), "w", buffering=1)
    people = os.fdopen(os.dup(2), "w", buffering=1) if json_mode else out
    with open(log_file, "ab", buffering=0) as log:
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
    to_log = logging.StreamHandler(sys.stderr)  # sys.stderr writes to the log now
    to_log.setFormatter(logging.Formatter("%(asctime)s %(name)s: %(message)s"))
    terminal = _Terminal(people)
    for logger in (STAGES, EPOCH_LOG):
        logger.setLevel(logging.INFO)
        logger.propagate = False
        logger.addHandler(terminal)
        logger.addHandler(to_log)
    return out, people
