"""Each step's log on stdlib logging: `step_log(path)` is the logger whose one handler appends
to that step's log file. Every module writes its lines there (and tools.say writes the terminal's
line); no module opens a log to append to it by hand."""

import hashlib
import logging
from pathlib import Path

STEPS = "repo2singularity.steps"


class AppendingFileHandler(logging.FileHandler):
    """A FileHandler that closes the file after each line: the tools a step runs append to the
    same log between our lines, and a process that writes many logs (the tests, a service)
    keeps none of them open."""

    def __init__(self, path):
        super().__init__(path, mode="a", encoding="utf-8", delay=True)
        self.setFormatter(logging.Formatter("%(message)s"))

    def emit(self, record):
        try:
            super().emit(record)
        finally:
            self.close()


def step_log(path):
    """The logger of the log file at `path` (a logger that drops everything when `path` is empty)."""
    if not path:
        logger = logging.getLogger(f"{STEPS}.none")
        if not logger.handlers:
            logger.addHandler(logging.NullHandler())
            logger.propagate = False
        return logger
    path = Path(path).absolute()
    logger = logging.getLogger(f"{STEPS}.{hashlib.sha256(str(path).encode()).hexdigest()[:16]}")
    if not logger.handlers:
        logger.addHandler(AppendingFileHandler(path))
        logger.setLevel(logging.INFO)
        logger.propagate = False
    return logger
