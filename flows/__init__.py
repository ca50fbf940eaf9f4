"""Prefect flows of realfake: the end-to-end build, one flow per stage, and scheduled regeneration.

Flows are thin: each takes one typed parameter model (:mod:`flows.params`), validates it into a
:class:`realfake.config.BuildConfig`, and composes the tasks of :mod:`tasks`. Deployments reference them as
``flows/<module>.py:<name>_flow`` (``deployments/prefect.yaml``).
"""

__all__ = ["build", "finetune", "params", "prepare", "regenerate", "synthesize", "train_eval"]
