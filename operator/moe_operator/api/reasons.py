"""Every condition type and reason the operator writes into a condition or status.rollout, once."""

from __future__ import annotations

# Why a rollout was aborted or paused (status.rollout.aborted.reason / .paused.reason).
ABORT_ALERT = "AlertFiring"
ABORT_ANALYSIS = "AnalysisFailed"
ABORT_INCONCLUSIVE = "AnalysisInconclusive"
ABORT_USER = "AbortedByUser"
ABORT_DEADLINE = "ProgressDeadlineExceeded"


# Condition types and the reasons of Available / Progressing / Degraded (status.py).
SCALING_LIMITED = "ScalingLimited"  # only with spec.autoscaling
ALL_REPLICAS_READY = "AllReplicasReady"
SCALED_TO_ZERO = "ScaledToZero"
MODEL_LOADING = "ModelLoading"
INSUFFICIENT_GPU = "InsufficientGPUCapacity"
UNSCHEDULABLE = "Unschedulable"
PODS_FAILING = "PodsFailing"
GROUP_RESTARTING = "GroupRestarting"  # a rank of a multi-pod group failed: the whole group is re-created
INVALID_SPEC = "InvalidSpec"
ROLLING_OUT = "RollingOut"
SCALING_UP = "ScalingUp"
SCALING_DOWN = "ScalingDown"
CONVERGED = "Converged"
HEALTHY = "Healthy"

# A rollout running, paused, aborted or rolling back (Progressing / Degraded).
ROLLOUT_ABORTED = "RolloutAborted"
ROLLING_BACK = "RollingBack"  # aborted after promotion; the old revision is being restored
ROLLOUT_PAUSED = "RolloutPaused"

# The built-in autoscaler's decisions and its ScalingLimited condition (status.autoscaling).
SCALE_UP = "ScaleUp"
SCALE_DOWN = "ScaleDown"
WITHIN_TOLERANCE = "WithinTolerance"
UP_STABILIZING = "ScaleUpStabilizing"
DOWN_STABILIZING = "ScaleDownStabilizing"
WAITING_FOR_LOADING = "WaitingForLoadingGroups"
NO_SIGNAL = "NoSignal"
FROZEN = "FrozenDuringRollout"
BELOW_MIN = "BelowMinReplicas"
ABOVE_MAX = "AboveMaxReplicas"
TOO_MANY = "TooManyReplicas"
TOO_FEW = "TooFewReplicas"
WITHIN_RANGE = "DesiredWithinRange"
