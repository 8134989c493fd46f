"""A quiet console: fedslim prints one line per round; Flower's and Ray's logs go to a file.

``framework_logs(path, verbose)`` moves the handlers of Flower's ``flwr`` logger off the
console and onto ``path`` (``<output-dir>/flower.log``) for the duration of a ``with``
block, routes the Python warnings libraries emit (e.g. deprecations) to the same file, and
restores everything afterwards. With ``verbose=True`` nothing is moved.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from pathlib import Path

FRAMEWORK_LOG = "flower.log"
_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


@contextlib.contextmanager
def framework_logs(path: Path, verbose: bool) -> Iterator[None]:
    """Send the ``flwr`` logger (and Python warnings) to ``path`` unless ``verbose``."""
    if verbose:
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    logger = logging.getLogger("flwr")
    file_handler = logging.FileHandler(path, encoding="utf-8")
    file_handler.setFormatter(logging.Formatter(_FORMAT))
    file_handler.setLevel(logging.INFO)
    console = [h for h in logger.handlers if not isinstance(h, logging.FileHandler)]
    for h in console:
        logger.removeHandler(h)
    logger.addHandler(file_handler)
    warn_logger = logging.getLogger("py.warnings")
    warn_logger.addHandler(file_handler)
    warn_logger.propagate = False
    logging.captureWarnings(True)
    try:
        yield
    finally:
        logging.captureWarnings(False)
        warn_logger.removeHandler(file_handler)
        warn_logger.propagate = True
        logger.removeHandler(file_handler)
        file_handler.close()
        for h in console:
            logger.addHandler(h)
