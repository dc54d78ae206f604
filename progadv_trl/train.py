"""``progadv train --config FILE.yaml``: a GRPO/RLOO run from YAML with the callback attached.

A thin recipe over TRL: the YAML holds the trainer's own arguments (``args:``, any ``GRPOConfig``/``RLOOConfig``
field), the model, the dataset, the reward functions, an optional LoRA section, and a ``progadv:`` section
(:class:`~progadv_trl.ProgressAdvantageConfig` fields). See the packaged ``grpo_tiny`` config
(``progadv_trl/configs/grpo_tiny.yaml``; ``progadv train --config grpo_tiny``).

* ``model_name_or_path``: a folder or hub id; ``tiny`` builds a tiny Qwen2 and tokenizer in ``<output_dir>/base``.
* ``dataset``: a JSON/JSONL file of rows with a ``prompt`` column, or ``builtin:flights`` (the bundled booking task).
* ``reward_funcs``: ``module:function`` or ``path/to/file.py:function`` strings (your own code, imported as such).
* ``progadv.heldout``: labelled rollouts; ``builtin:flights`` writes the bundled example to ``<output_dir>``.
"""

from __future__ import annotations

import importlib
import importlib.util
from pathlib import Path

TRAINERS = ("grpo", "rloo")


def _import(spec: str):
    if ":" not in spec:
        raise ValueError(f"reward function {spec!r}: expected 'module:function' or 'file.py:function'")
    where, name = spec.rsplit(":", 1)
    if where.endswith(".py"):
        module_spec = importlib.util.spec_from_file_location(Path(where).stem, where)
        module = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(module)
    else:
        module = importlib.import_module(where)
    return getattr(module, name)


def load_run_config(path: str | Path) -> dict:
    """The run YAML at ``path``, or the packaged config of that name (``grpo_tiny``), checked."""
    import yaml

    from .configs import resolve

    path = resolve(path)
    with open(path, encoding="utf-8") as f:
        data = yaml.safe_load(f)
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping")
    unknown = set(data) - {"model_name_or_path", "trainer", "dataset", "reward_funcs", "peft", "args", "progadv"}
    if unknown:
        raise ValueError(f"{path}: unknown top-level key(s) {sorted(unknown)}")
    for key in ("model_name_or_path", "dataset", "reward_funcs", "args"):
        if key not in data:
            raise ValueError(f"{path}: field '{key}' is required")
    if data.get("trainer", "grpo") not in TRAINERS:
        raise ValueError(f"{path}: field 'trainer': expected one of {TRAINERS}")
    return data


def train_from_config(path: str | Path, overrides: dict | None = None):
    """Build the trainer and callback from ``path`` and train; returns the trainer."""
    from datasets import Dataset, load_dataset
    from trl import GRPOConfig, GRPOTrainer, RLOOConfig, RLOOTrainer

    from .callback import ProgressAdvantageCallback
    from .config import ProgressAdvantageConfig
    from .flight_example import example_trajectories, flight_prompts
    from .formats import save_trajectories
    from .tiny import build_model, build_tokenizer

    run = load_run_config(path)
    args_dict = {"report_to": "none", **run["args"], **(overrides or {})}
    out = Path(args_dict.get("output_dir", "runs/progadv"))
    args_dict["output_dir"] = str(out)
    kind = run.get("trainer", "grpo")
    args = (GRPOConfig if kind == "grpo" else RLOOConfig)(**args_dict)

    model = run["model_name_or_path"]
    if model == "tiny":
        model = str(out / "base")
        if not (out / "base" / "config.json").exists():
            build_model(build_tokenizer(), model)
    dataset = run["dataset"]
    train = (Dataset.from_list(flight_prompts()) if dataset == "builtin:flights"
             else load_dataset("json", data_files=dataset, split="train"))
    rewards = [_import(s) for s in run["reward_funcs"]]
    peft_config = None
    if run.get("peft"):
        from peft import LoraConfig

        peft_config = LoraConfig(**run["peft"])
    progadv = dict(run.get("progadv") or {})
    if progadv.get("heldout") == "builtin:flights":
        progadv["heldout"] = str(out / "heldout.jsonl")
        out.mkdir(parents=True, exist_ok=True)
        save_trajectories(progadv["heldout"], example_trajectories(n_groups=4, seed=1))
    config = ProgressAdvantageConfig.from_settings(progadv, source=f"{path}: progadv")  # before the model loads
    trainer_cls = GRPOTrainer if kind == "grpo" else RLOOTrainer
    trainer = trainer_cls(model=model, reward_funcs=rewards, args=args, train_dataset=train, peft_config=peft_config)
    trainer.add_callback(ProgressAdvantageCallback(trainer=trainer, config=config))
    trainer.train()
    return trainer
