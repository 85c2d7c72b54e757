"""Prefect tasks: thin wrappers adding retries, caching, concurrency, artifacts and logging
around loraflow core functions.

Importing the package keeps run logs readable: transformers' per-load progress bars and
load reports would otherwise bury the run's own logs. The settings go through the environment,
which transformers and huggingface_hub read when first imported, so that a run served from the
cache never imports them (a second of start-up); a level the user set is kept. Where they were
imported first (a notebook), they are told directly.
"""

import os
import sys
import warnings

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
if "transformers" in sys.modules:
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()
    transformers_logging.set_verbosity_error()
warnings.filterwarnings("ignore", category=FutureWarning, module=r"(transformers|peft)\.")
