"""Prefect tasks: thin wrappers adding retries, caching, concurrency, artifacts and logging
around loraflow core functions.

Importing the package keeps run logs readable: transformers' per-load progress bars and
load reports would otherwise bury the run's own logs.
"""

import warnings

from transformers.utils import logging as transformers_logging

transformers_logging.disable_progress_bar()
transformers_logging.set_verbosity_error()
warnings.filterwarnings("ignore", category=FutureWarning, module=r"(transformers|peft)\.")
