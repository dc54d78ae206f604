"""A built-in agent task whose optimal advantages are known exactly, and the tools to train and label on it.

* :mod:`.number_line`: the task (stochastic multi-turn number-line walk, paraphrased replies).
* :mod:`.exact`: the KL-regularised optimum ``A*(h, y) = Q*(h, y) - V*(h)`` by DP over the tree of histories.
* :mod:`.codec` / :mod:`.oracle`: token ids under the chat template; ``log P_ref(y | h)`` from a causal LM.
* :mod:`.pretrain`: a tiny reference fine-tuned on imperfect, biased demonstrations.
* :mod:`.sampling`: episodes of an LM policy, labelled with exact ``A*`` and the decisive mistake.
* :mod:`.training`: GRPO on the task with TRL (``rollout_func``), on CPU.
"""

from .codec import ChatCodec
from .exact import ExactSolution, ExactSolver, solve
from .number_line import ACTIONS, NumberLineEnv, State, Task
from .oracle import LMReplyOracle
from .pretrain import NoisyDemonstrator, train_reference
from .sampling import Episode, run_episodes, sample_episodes, to_trajectory
from .training import make_rollout_func, train_grpo

__all__ = [
    "ACTIONS", "ChatCodec", "Episode", "ExactSolution", "ExactSolver", "LMReplyOracle", "NoisyDemonstrator",
    "NumberLineEnv", "State", "Task", "make_rollout_func", "run_episodes", "sample_episodes", "solve",
    "to_trajectory", "train_grpo", "train_reference",
]
