"""loraflow core: dataset to trained, evaluated, registered LoRA adapter. Never imports Prefect."""

__version__ = "0.1.0"
