"""Built-in agent tasks whose optimal advantages are known exactly, and the tools to train and label on them.

* :mod:`.number_line`: a fully observed task (stochastic multi-turn number-line walk, paraphrased replies).
* :mod:`.repair`: a partially observed task (hidden faulty part, noisy tool readings, an irreversible mistake).
* :mod:`.tasks`: the tasks by name (environment, demonstrator, defaults).
* :mod:`.exact`: the KL-regularised optimum ``A*(h, y) = Q*(h, y) - V*(h)`` by DP over the tree of observation
  histories (with a belief over hidden states).
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
from .repair import RepairDemonstrator, RepairEnv, RepairTask
from .sampling import Episode, run_episodes, sample_episodes, to_trajectory
from .tasks import TASKS, make_env
from .training import make_rollout_func, train_grpo

__all__ = [
    "ACTIONS", "ChatCodec", "Episode", "ExactSolution", "ExactSolver", "LMReplyOracle", "NoisyDemonstrator",
    "NumberLineEnv", "RepairDemonstrator", "RepairEnv", "RepairTask", "State", "TASKS", "Task", "make_env",
    "make_rollout_func", "run_episodes", "sample_episodes", "solve", "to_trajectory", "train_grpo",
    "train_reference",
]
