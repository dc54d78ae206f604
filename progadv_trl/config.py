"""``ProgressAdvantageConfig``: everything a user sets for scoring, in one dataclass, readable from YAML."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .advantage import STEP_AGGREGATIONS, TOKEN_AGGREGATIONS
from .baselines import BASELINES
from .uses import ATTRIBUTION_METHODS

CONFIG_VERSION = 1
RENDERINGS = ("chat_template", "plain")
COMPAT_MODES = ("authors",)
BACKENDS = ("auto", "torch", "triton")
BEST_EXPORTS = ("end", "every_best", "none")


@dataclass
class ProgressAdvantageConfig:
    r"""
    Configuration of progress-advantage scoring.

    Parameters:
        beta (`float`, *optional*, defaults to `1.0`):
            Scale of the log-ratio, ``A_t = beta * (log pi - log pi_ref)``. Use the trainer's KL coefficient; with a
            beta-0 run (TRL's GRPO default, DAPO) keep 1.0. It changes no ranking, AUROC or argmin.
        temperature (`float`, *optional*, defaults to `1.0`):
            Both models' logits are divided by it, as TRL does with its generation temperature.
        token_agg (`str` or `None`, *optional*, defaults to `None`):
            How a step's token advantages are aggregated: ``"sum"``, ``"mean"``, ``"last"``, ``"min"``, ``"max"``.
            ``None`` means ``"sum"`` (the turn-level advantage), or ``"mean"`` under ``compat="authors"``.
        step_agg (`str`, *optional*, defaults to `"mean"`):
            How step advantages make a trajectory score: ``"mean"``, ``"sum"``, ``"last"``, ``"min"``, ``"max"``,
            ``"bottom10"``.
        cumulative (`bool`, *optional*, defaults to `False`):
            Aggregate the running sums of step advantages (the ImplicitPRM q-value view) instead of the steps.
        compat (`str` or `None`, *optional*, defaults to `None`):
            ``"authors"`` reproduces the paper code: plain rendering, each model's log-probs aggregated separately
            and then subtracted, mean/mean unless aggregations are given.
        rendering (`str`, *optional*, defaults to `"chat_template"`):
            ``"chat_template"`` (each model's own template) or ``"plain"`` (``[role]: content`` lines, BOS first).
        step_separator (`str` or `None`, *optional*, defaults to `None`):
            Split each action's content into several steps at this separator (e.g. ``"\n\n"``), as process reward
            models do with flat completions.
        max_length (`int`, *optional*, defaults to `16384`):
            Longer trajectories are truncated from the left; the output records what was cut.
        baselines (`list[str]`, *optional*, defaults to `[]`):
            Baselines to report beside the score (see ``progadv_trl.baselines.BASELINES``), or ``["all"]``.
        top_k (`int`, *optional*, defaults to `20`):
            k of the DeepConf token confidence.
        deepconf_window (`int`, *optional*, defaults to `2048`):
            Sliding-window length (tokens) of DeepConf's bottom-10% and lowest-window scores.
        deepconf_tail (`int`, *optional*, defaults to `2048`):
            Number of final tokens of DeepConf's tail score.
        success_threshold (`float`, *optional*, defaults to `1.0`):
            A trajectory succeeded when its reward is at least this.
        attribution (`str`, *optional*, defaults to `"running_sum"`):
            Failure attribution: ``"running_sum"`` (argmin of the running sum of step advantages), ``"step"`` (argmin
            of the step advantage) or ``"threshold"`` (earliest running sum below ``attribution_threshold``).
        attribution_threshold (`float` or `None`, *optional*, defaults to `None`):
            Threshold for ``attribution="threshold"``, fitted on held-out data.
        batch_size (`int`, *optional*, defaults to `8`):
            Trajectories per forward pass (they are sorted by length first).
        chunk_size (`int` or `None`, *optional*, defaults to `None`):
            Vocabulary chunk of the fused statistics kernel; ``None`` picks one for the device.
        backend (`str`, *optional*, defaults to `"auto"`):
            Fused-kernel implementation: ``"torch"`` (tiled PyTorch fold, validated on CPU and CUDA), ``"triton"``
            (fused Triton matmul, CUDA only, opt-in until it has passed its tests on GPU hardware) or ``"auto"``
            (today the same as ``"torch"`` on every device).
        seed (`int`, *optional*, defaults to `0`):
            Seed of the random baseline.

        > Parameters used during training (callback and monitor)

        heldout (`str`, `datasets.Dataset`, `list` or `None`, *optional*, defaults to `None`):
            Fixed labelled rollouts scored at every evaluation: a file or folder for
            :func:`~progadv_trl.load_trajectories`, a dataset, or a list of trajectories.
        heldout_prompts (`str`, `datasets.Dataset`, `list` or `None`, *optional*, defaults to `None`):
            Held-out prompts: at every evaluation the current policy samples ``eval_num_generations`` completions per
            prompt with the trainer's sampling settings, labelled by the trainer's reward functions.
        eval_num_generations (`int` or `None`, *optional*, defaults to `None`):
            Completions per held-out prompt; ``None`` means the trainer's ``num_generations``.
        eval_steps (`int` or `None`, *optional*, defaults to `None`):
            Evaluate every this many optimizer steps (and at train begin and end); ``None`` means the trainer's
            resolved evaluation interval when ``eval_strategy="steps"`` (fractions of ``max_steps`` included), else
            its resolved ``logging_steps``.
        reference_placement (`str`, *optional*, defaults to `"auto"`):
            Where a snapshot reference (beta-0 runs, ``sync_ref_model``) lives: ``"device"`` (beside the policy),
            ``"cpu"``, or ``"disk"`` (safetensors, loaded for each evaluation). ``"auto"`` is ``"device"``. The
            snapshot is also written to disk once so that a resumed run keeps the initial reference.
        reference_cache (`bool`, *optional*, defaults to `True`):
            Remember the reference's hidden states on the fixed held-out rollouts: one reference forward for the whole
            run. With ``reference_placement="disk"`` the snapshot is then not even loaded again after the first
            evaluation (only its LM head is kept, and weight drift is read from its safetensors file by file).
        follow_sync_ref_model (`bool`, *optional*, defaults to `False`):
            With ``sync_ref_model=True``, use TRL's moving reference instead of the initial policy.
        also_temperature_one (`bool`, *optional*, defaults to `False`):
            Also log the signal quality at temperature 1.0 (``progadv/t1/...``) when the trainer samples at another.
        quality_metric (`str`, *optional*, defaults to `"auroc"`):
            The metric that defines the best evaluation and the decay warning: ``"auroc"``, ``"spearman"``,
            ``"best_of_n"`` or ``"attribution_accuracy"``.
        decay_margin (`float`, *optional*, defaults to `0.05`):
            Warn when the quality metric falls this far below its best value.
        log_baselines (`bool`, *optional*, defaults to `True`):
            Log each baseline's metrics beside progress advantage (``progadv/baseline/<name>/<metric>``).
        export (`bool`, *optional*, defaults to `True`):
            Export the final scorer (``<export_dir>/scorer``) at train end and the best one (``scorer-best``).
        export_dir (`str` or `None`, *optional*, defaults to `None`):
            Where the exported scorers and the snapshot reference go; relative paths are inside ``output_dir``.
            ``None`` means ``<output_dir>/_progadv``, which ``Trainer.push_to_hub`` does not upload (it skips names
            starting with ``_``). Name a folder without the underscore to upload the scorers with the model.
        best_export (`str`, *optional*, defaults to `"end"`):
            When the best scorer is written: ``"end"`` keeps the best policy's trainable weights in CPU memory (only
            the adapter under PEFT) and writes ``scorer-best`` once, at train end; ``"every_best"`` writes it at every
            new best (survives a crash, costs a full copy of the weights per new best); ``"none"`` never.
    """

    beta: float = field(default=1.0, metadata={"help": "Scale of the log-ratio (the trainer's KL coefficient; 1.0 for beta-0 runs)."})
    temperature: float = field(default=1.0, metadata={"help": "Sampling temperature the logits are divided by."})
    token_agg: str | None = field(default=None, metadata={"help": "Token aggregation within a step.", "choices": TOKEN_AGGREGATIONS})
    step_agg: str = field(default="mean", metadata={"help": "Step aggregation over a trajectory.", "choices": STEP_AGGREGATIONS})
    cumulative: bool = field(default=False, metadata={"help": "Aggregate running sums of step advantages (ImplicitPRM view)."})
    compat: str | None = field(default=None, metadata={"help": "'authors' reproduces the paper code's conventions.", "choices": COMPAT_MODES})
    rendering: str = field(default="chat_template", metadata={"help": "How messages become text.", "choices": RENDERINGS})
    step_separator: str | None = field(default=None, metadata={"help": "Split each action's content into steps at this separator."})
    max_length: int = field(default=16384, metadata={"help": "Left-truncate trajectories longer than this many tokens."})
    baselines: list[str] = field(default_factory=list, metadata={"help": "Baselines to report, or ['all']."})
    top_k: int = field(default=20, metadata={"help": "k of DeepConf's token confidence."})
    deepconf_window: int = field(default=2048, metadata={"help": "DeepConf sliding-window length in tokens."})
    deepconf_tail: int = field(default=2048, metadata={"help": "DeepConf tail length in tokens."})
    success_threshold: float = field(default=1.0, metadata={"help": "Success means reward >= this."})
    attribution: str = field(default="running_sum", metadata={"help": "Failure attribution method.", "choices": ATTRIBUTION_METHODS})
    attribution_threshold: float | None = field(default=None, metadata={"help": "Threshold for attribution='threshold'."})
    batch_size: int = field(default=8, metadata={"help": "Trajectories per forward pass."})
    chunk_size: int | None = field(default=None, metadata={"help": "Vocabulary chunk of the fused kernel."})
    backend: str = field(default="auto", metadata={"help": "Fused-kernel backend ('auto' is 'torch' everywhere today).", "choices": BACKENDS})
    seed: int = field(default=0, metadata={"help": "Seed of the random baseline."})
    heldout: Any = field(default=None, metadata={"help": "Fixed labelled held-out rollouts (path, dataset or list)."})
    heldout_prompts: Any = field(default=None, metadata={"help": "Held-out prompts the current policy completes at each evaluation."})
    eval_num_generations: int | None = field(default=None, metadata={"help": "Completions per held-out prompt (default: the trainer's num_generations)."})
    eval_steps: int | None = field(default=None, metadata={"help": "Evaluate every this many steps (default: trainer's eval_steps, else logging_steps)."})
    reference_placement: str = field(default="auto", metadata={"help": "Where a snapshot reference lives.", "choices": ("auto", "device", "cpu", "disk")})
    reference_cache: bool = field(default=True, metadata={"help": "Cache the reference's hidden states on fixed held-out rollouts."})
    follow_sync_ref_model: bool = field(default=False, metadata={"help": "With sync_ref_model, follow TRL's moving reference."})
    also_temperature_one: bool = field(default=False, metadata={"help": "Also log signal quality at temperature 1.0."})
    quality_metric: str = field(default="auroc", metadata={"help": "Metric defining the best evaluation.", "choices": ("auroc", "spearman", "best_of_n", "attribution_accuracy")})
    decay_margin: float = field(default=0.05, metadata={"help": "Warn when quality falls this far below its best."})
    log_baselines: bool = field(default=True, metadata={"help": "Log the baselines' metrics too."})
    export: bool = field(default=True, metadata={"help": "Export the final and the best scorer."})
    export_dir: str | None = field(default=None, metadata={"help": "Where scorers and the snapshot reference go (default: <output_dir>/_progadv, not pushed to the Hub)."})
    best_export: str = field(default="end", metadata={"help": "When the best scorer is written.", "choices": BEST_EXPORTS})

    def __post_init__(self):
        def check(name: str, ok: bool, expected: str):
            if not ok:
                raise ValueError(f"ProgressAdvantageConfig.{name}={getattr(self, name)!r}: expected {expected}")

        if self.baselines is None:
            self.baselines = []
        if isinstance(self.baselines, str):
            self.baselines = [b for b in self.baselines.split(",") if b]
        self.baselines = list(BASELINES) if list(self.baselines) == ["all"] else list(self.baselines)
        if self.token_agg is None:
            self.token_agg = "mean" if self.compat == "authors" else "sum"
        if self.compat == "authors":
            self.rendering = "plain"
        check("beta", isinstance(self.beta, (int, float)) and self.beta > 0, "a positive number")
        check("temperature", isinstance(self.temperature, (int, float)) and self.temperature > 0, "a positive number")
        check("token_agg", self.token_agg in TOKEN_AGGREGATIONS, f"one of {TOKEN_AGGREGATIONS}")
        check("step_agg", self.step_agg in STEP_AGGREGATIONS, f"one of {STEP_AGGREGATIONS}")
        check("compat", self.compat in (None, *COMPAT_MODES), f"None or one of {COMPAT_MODES}")
        check("rendering", self.rendering in RENDERINGS, f"one of {RENDERINGS}")
        check("step_separator", self.step_separator is None or (isinstance(self.step_separator, str) and self.step_separator != ""), "None or a non-empty string")
        check("max_length", isinstance(self.max_length, int) and self.max_length >= 2, "an integer >= 2")
        unknown = [b for b in self.baselines if b not in BASELINES]
        check("baselines", not unknown, f"names from {BASELINES} or ['all'] (unknown: {unknown})")
        check("top_k", isinstance(self.top_k, int) and self.top_k >= 1, "an integer >= 1")
        check("deepconf_window", isinstance(self.deepconf_window, int) and self.deepconf_window >= 1, "an integer >= 1")
        check("deepconf_tail", isinstance(self.deepconf_tail, int) and self.deepconf_tail >= 1, "an integer >= 1")
        check("attribution", self.attribution in ATTRIBUTION_METHODS, f"one of {ATTRIBUTION_METHODS}")
        check("attribution_threshold", self.attribution != "threshold" or self.attribution_threshold is not None,
              "a number when attribution='threshold'")
        check("batch_size", isinstance(self.batch_size, int) and self.batch_size >= 1, "an integer >= 1")
        check("chunk_size", self.chunk_size is None or (isinstance(self.chunk_size, int) and self.chunk_size >= 1), "None or an integer >= 1")
        check("backend", self.backend in BACKENDS, f"one of {BACKENDS}")
        check("best_export", self.best_export in BEST_EXPORTS, f"one of {BEST_EXPORTS}")
        check("export_dir", self.export_dir is None or (isinstance(self.export_dir, str) and self.export_dir != ""), "None or a non-empty path")
        check("eval_steps", self.eval_steps is None or (isinstance(self.eval_steps, int) and self.eval_steps >= 1), "None or an integer >= 1")
        check("eval_num_generations", self.eval_num_generations is None or (isinstance(self.eval_num_generations, int) and self.eval_num_generations >= 1), "None or an integer >= 1")
        check("reference_placement", self.reference_placement in ("auto", "device", "cpu", "disk"), "one of auto, device, cpu, disk")
        check("quality_metric", self.quality_metric in ("auroc", "spearman", "best_of_n", "attribution_accuracy"), "one of auroc, spearman, best_of_n, attribution_accuracy")
        check("decay_margin", isinstance(self.decay_margin, (int, float)) and self.decay_margin >= 0, "a number >= 0")

    @property
    def per_model_aggregation(self) -> bool:
        """The authors aggregate each model's log-probs over a step, then subtract."""
        return self.compat == "authors"

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready fields; held-out data given as objects (datasets, lists) is recorded as ``None``."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        if out.get("export_dir") is not None:
            out["export_dir"] = str(out["export_dir"])
        for key in ("heldout", "heldout_prompts"):
            if not isinstance(out[key], (str, type(None))):
                out[key] = None
        return {"config_version": CONFIG_VERSION, **out}

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "config") -> "ProgressAdvantageConfig":
        data = dict(data)
        version = data.pop("config_version", CONFIG_VERSION)
        if not isinstance(version, int) or version > CONFIG_VERSION:
            raise ValueError(f"{source}: field 'config_version': {version!r} is newer than this progadv-trl supports "
                             f"({CONFIG_VERSION}); upgrade progadv-trl")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"{source}: unknown field(s) {unknown}; known: {sorted(names)}")
        return cls(**data)

    @classmethod
    def from_file(cls, path: str | Path) -> "ProgressAdvantageConfig":
        """Read a YAML or JSON file; in YAML the fields may sit under a top-level ``progadv:`` section."""
        import yaml

        text = Path(path).read_text(encoding="utf-8")
        try:
            data = json.loads(text) if str(path).endswith(".json") else yaml.safe_load(text)
        except (ValueError, yaml.YAMLError) as e:
            raise ValueError(f"{path}: not valid {'JSON' if str(path).endswith('.json') else 'YAML'}: {e}") from None
        if isinstance(data, dict) and isinstance(data.get("progadv"), dict):
            data = data["progadv"]
        if not isinstance(data, dict):
            raise ValueError(f"{path}: expected a mapping of config fields")
        return cls.from_dict(data, source=str(path))
