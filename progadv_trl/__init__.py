"""progadv-trl: step-level progress advantage, ``beta * (log pi - log pi_ref)``, for TRL runs and agent logs."""

__version__ = "0.1.0"

from .callback import ProgressAdvantageCallback
from .config import ProgressAdvantageConfig, ScoringConfig
from .data import Message, ProgadvDataError, ToolCall, Trajectory
from .formats import load_trajectories, save_trajectories
from .trajectory_scores import StepScore, TrajectoryScore
from .monitor import ProgressAdvantageMonitor
from .scorer import ProgressAdvantageScorer
from .reward import ProgressAdvantageReward

__all__ = [
    "Message", "ProgadvDataError", "ProgressAdvantageCallback", "ProgressAdvantageConfig", "ProgressAdvantageMonitor",
    "ProgressAdvantageReward", "ProgressAdvantageScorer", "ScoringConfig", "StepScore", "ToolCall",
    "Trajectory", "TrajectoryScore", "__version__", "load_trajectories", "save_trajectories",
]
