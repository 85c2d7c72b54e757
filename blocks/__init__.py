"""Custom Prefect blocks for loraflow. `prefect block register -m blocks` registers them.

- `LoraflowStorage`: where persisted results live so both work pools can read them.
- `TrainingInfrastructure`: the training deployment, its GPU pool, job variables and GPU slots.
- The Hugging Face hub token is a plain Prefect `Secret` block named `HUB_TOKEN_BLOCK`.
"""

from blocks.infrastructure import TrainingInfrastructure
from blocks.secrets import HUB_TOKEN_BLOCK, use_hub_token
from blocks.storage import LoraflowStorage

__all__ = ["HUB_TOKEN_BLOCK", "LoraflowStorage", "TrainingInfrastructure", "use_hub_token"]
