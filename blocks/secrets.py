"""The Hugging Face hub token, kept in a Prefect `Secret` block and never logged."""

from __future__ import annotations

import os

from prefect.blocks.system import Secret

HUB_TOKEN_BLOCK = "loraflow-hub-token"


def use_hub_token(name: str = HUB_TOKEN_BLOCK) -> bool:
    """Put the saved token in `HF_TOKEN` for this process (transformers reads it there).

    Returns whether a token was found; an explicitly set `HF_TOKEN` wins. The value goes to
    the environment only: never into parameters, job variables or logs, which the UI shows.
    """
    if os.environ.get("HF_TOKEN"):
        return True
    try:
        token = Secret.load(name).get()
    except ValueError:
        return False
    os.environ["HF_TOKEN"] = token
    return True
