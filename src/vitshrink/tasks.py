"""The tasks vitshrink compresses for and the metric each is judged by: one owner (stdlib only, so every
floor can import it, the torch-free deploy side included)."""

from __future__ import annotations

TASKS = ("classification", "segmentation")
TASK_METRIC = {"classification": "accuracy", "segmentation": "miou"}  # the headline metric of each task
