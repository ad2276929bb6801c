"""moe-operator: a kopf operator that runs Mixture-of-Experts model servers as GPU pod groups.

Data flow (one level-based reconcile per ModelDeployment):
spec (`spec.py`) -> plan (`plan.py`) -> desired objects (`pods.py`, `services.py`, `desired.py`)
-> apply (`apply.py`, the one writer) -> observe (`observe.py`, the one reader) -> status (`status.py`).
"""

__version__ = "0.1.0"
