"""GRPO with progress-advantage monitoring: the three lines you add to a TRL script are marked `# progadv`.

    python examples/grpo_with_progadv.py                 # tiny model built on the spot, CPU, a few minutes
    python examples/grpo_with_progadv.py --model Qwen/Qwen3-0.6B --heldout my_rollouts.jsonl   # a real run

Held-out rollouts are labelled trajectories (our JSONL: {"id", "group", "messages", "reward", "mistake_step"}). After
training, `<output_dir>/progadv-history.jsonl` holds the drift history and `<output_dir>/_progadv/scorer` the exported
scorer (`ProgressAdvantageScorer.from_pretrained`).
"""

import argparse
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from datasets import Dataset  # noqa: E402
from trl import GRPOConfig, GRPOTrainer  # noqa: E402

from progadv_trl import ProgressAdvantageCallback, ProgressAdvantageConfig  # noqa: E402  # progadv
from progadv_trl.flight_example import example_trajectories, flight_prompts, reward_books_cheapest  # noqa: E402
from progadv_trl.formats import save_trajectories  # noqa: E402
from progadv_trl.tiny import build_model, build_tokenizer  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="model id or folder (default: a tiny model built here)")
    p.add_argument("--heldout", default=None, help="labelled held-out rollouts (default: the bundled example)")
    p.add_argument("--output-dir", default="runs/grpo-progadv")
    p.add_argument("--max-steps", type=int, default=20)
    p.add_argument("--beta", type=float, default=0.04)
    args = p.parse_args()

    model = args.model
    if model is None:
        model = os.path.join(args.output_dir, "base")
        build_model(build_tokenizer(), model, hidden_size=64, num_layers=2)
    heldout = args.heldout
    if heldout is None:
        heldout = os.path.join(args.output_dir, "heldout.jsonl")
        save_trajectories(heldout, example_trajectories(n_groups=4, seed=1))
    train = Dataset.from_list(flight_prompts(n=64))
    config = GRPOConfig(output_dir=args.output_dir, max_steps=args.max_steps, per_device_train_batch_size=8,
                        num_generations=4, max_completion_length=16, logging_steps=5, beta=args.beta,
                        learning_rate=1e-3, use_cpu=True, bf16=False, report_to="none", save_strategy="no")
    trainer = GRPOTrainer(model=model, reward_funcs=reward_books_cheapest, args=config, train_dataset=train)
    trainer.add_callback(ProgressAdvantageCallback(  # progadv
        trainer=trainer, config=ProgressAdvantageConfig(heldout=heldout)))  # progadv
    trainer.train()
    print(f"history: {args.output_dir}/progadv-history.jsonl   scorer: {args.output_dir}/_progadv/scorer")


if __name__ == "__main__":
    main()
