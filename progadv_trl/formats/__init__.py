"""Agent trajectories from files, ``datasets.Dataset`` objects and lists, as validated
:class:`~progadv_trl.data.Trajectory` objects.

Formats (:data:`FORMATS`): ``jsonl`` (ours; what :func:`save_trajectories` writes), ``trl`` (TRL prompt/completion
rows), ``stepwise`` (TRL stepwise supervision: per-step labels), ``tau2`` (tau2-bench results), ``whowhen`` (Who&When
logs) and ``dataset`` (a ``datasets.Dataset`` or a list of dicts); ``format="auto"`` detects which. Dataset folders,
``.parquet`` files and Hub dataset ids are read through ``datasets`` (:mod:`.hf`). Every error is a
:class:`~progadv_trl.data.ProgadvDataError` naming the source, the record and the field. Each format, field by field,
with an example: ``docs/formats.md``.

Modules: :mod:`.records` (the parsers every format shares), :mod:`.reading` (JSON from files), one per format
(:mod:`.jsonl`, :mod:`.trl`, :mod:`.stepwise`, :mod:`.tau2`, :mod:`.who_and_when`, :mod:`.objects`, :mod:`.hf`) and
:mod:`.loading` (detection, validation, the API).
"""

from .jsonl import save_trajectories
from .loading import iter_trajectories, load_trajectories
from .records import FORMATS
from .stepwise import STEP_SEPARATOR, stepwise_separator
from .who_and_when import WHOWHEN_SUBSETS, AgentAttribution, whowhen_agent

__all__ = ["FORMATS", "STEP_SEPARATOR", "WHOWHEN_SUBSETS", "AgentAttribution", "iter_trajectories",
           "load_trajectories", "save_trajectories", "stepwise_separator", "whowhen_agent"]
