"""Prefect deployments of lora-prep: prefect.yaml (work pools), serve.py (one process), examples/ (GPU fleets)."""
