"""The earlier built-in demo: a flight-booking agent's trajectories, tiny models trained on the spot, scored.

Run (from the repository root; 70 s measured on 2 CPU cores, ``--quick`` less):

    python examples/flight_demo.py --output-dir flight-demo

1. writes the bundled example trajectories (groups of 8 attempts at one booking task, successes and labelled
   failures) to ``<output_dir>/trajectories-{train,heldout}.jsonl``;
2. builds a byte-level BPE tokenizer and a tiny Qwen2 model, and trains the *reference* on every training attempt;
3. trains the *policy* from the reference on the successful attempts only, with a KL penalty to the reference
   (a stand-in for KL-regularised RL: rejection-sampling fine-tuning);
4. scores the held-out groups with ``ProgressAdvantageScorer``, prints the metric table and saves the scorer.

It checks the pipeline on models trained in seconds; the method's claims are tested by ``progadv demo`` (an agent
environment with exact optimal advantages). ``benchmarks/aggregation_choice.py`` reads this script's output folder.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from progadv_trl.flight_example import example_trajectories  # noqa: E402


def _train(model, tokenize, trajectories, steps: int, lr: float, reference=None, kl_coef: float = 0.0,
           seed: int = 0, desc: str = "train"):
    """Next-token training on the action tokens (optionally with a KL penalty to ``reference``)."""
    import torch
    from tqdm.auto import tqdm

    toks = [tokenize(t) for t in trajectories]
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    model.train()
    for _ in tqdm(range(steps), desc=desc, leave=False, disable=None):
        batch = [toks[i] for i in torch.randint(len(toks), (8,), generator=gen).tolist()]
        width = max(len(t.input_ids) for t in batch)
        ids = torch.zeros((len(batch), width), dtype=torch.long)
        mask = torch.zeros_like(ids)
        target_mask = torch.zeros_like(ids, dtype=torch.bool)
        for r, t in enumerate(batch):
            n = len(t.input_ids)
            ids[r, :n] = torch.tensor(t.input_ids)
            mask[r, :n] = 1
            target_mask[r, :n] = torch.tensor(t.step_index) >= 0
        logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
        logp = torch.log_softmax(logits, -1)
        tm = target_mask[:, 1:]
        nll = -logp.gather(-1, ids[:, 1:, None]).squeeze(-1)[tm].mean()
        loss = nll
        if reference is not None and kl_coef:
            with torch.no_grad():
                ref_logp = torch.log_softmax(reference(input_ids=ids, attention_mask=mask).logits[:, :-1].float(), -1)
            kl = (logp.exp() * (logp - ref_logp)).sum(-1)[tm].mean()
            loss = loss + kl_coef * kl
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    return model


def run_demo(output_dir: str | Path = "flight-demo", *, quick: bool = False, seed: int = 0) -> dict:
    """Run the demo and return its metric table (also written to ``<output_dir>/metrics.json``)."""
    import torch

    from progadv_trl.formats import save_trajectories
    from progadv_trl.metrics import format_table
    from progadv_trl.rendering import TrajectoryTokenizer
    from progadv_trl.scorer import ProgressAdvantageScorer
    from progadv_trl.tiny import build_model, build_tokenizer, perturbed_copy

    t0 = time.time()
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    n_train, n_test = (12, 6) if quick else (32, 16)
    data = example_trajectories(n_train + n_test, seed=seed)
    train, heldout = data[: 8 * n_train], data[8 * n_train:]
    save_trajectories(out / "trajectories-train.jsonl", train)
    save_trajectories(out / "trajectories-heldout.jsonl", heldout)
    print(f"[1/4] {len(train)} training and {len(heldout)} held-out trajectories -> {out}")

    tokenizer = build_tokenizer(out / "reference")
    tokenize = TrajectoryTokenizer(tokenizer)
    reference = build_model(tokenizer, arch="qwen2", hidden_size=64, num_layers=2, seed=seed)
    _train(reference, tokenize, train, steps=60 if quick else 200, lr=3e-3, seed=seed, desc="reference")
    reference.save_pretrained(out / "reference")
    print(f"[2/4] reference trained on all training attempts ({time.time() - t0:.0f}s)")

    policy = perturbed_copy(reference, scale=0.0)
    successes = [t for t in train if t.reward == 1.0]
    _train(policy, tokenize, successes, steps=40 if quick else 120, lr=1e-3, reference=reference, kl_coef=0.1,
           seed=seed + 1, desc="policy")
    policy.save_pretrained(out / "policy")
    tokenizer.save_pretrained(out / "policy")
    print(f"[3/4] policy trained from the reference on {len(successes)} successes, KL-regularised "
          f"({time.time() - t0:.0f}s)")

    scorer = ProgressAdvantageScorer.from_models(out / "policy", out / "reference", baselines=["all"])
    results = scorer.score(heldout)
    table = scorer.evaluate(results)
    scorer.save_pretrained(out / "scorer")
    with open(out / "scores.jsonl", "w", encoding="utf-8") as f:
        for r in results:
            f.write(json.dumps(r.to_dict(scorer.config.baselines)) + "\n")
    summary = {"n_heldout": len(heldout), "n_groups": n_test, "seconds": round(time.time() - t0, 1),
               "config": scorer.config.to_dict(), "table": table}
    (out / "metrics.json").write_text(json.dumps(summary, indent=2), encoding="utf-8")
    print(f"[4/4] scored {len(heldout)} held-out trajectories ({time.time() - t0:.0f}s)\n")
    print(format_table(table, ["auroc", "spearman", "best_of_n", "mean_success", "oracle", "attribution_accuracy",
                               "attribution_mae"]))
    print(f"\nscorer: {out / 'scorer'}   scores: {out / 'scores.jsonl'}   metrics: {out / 'metrics.json'}")
    return summary



if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--output-dir", default="flight-demo")
    parser.add_argument("--quick", action="store_true", help="smaller and faster")
    args = parser.parse_args()
    run_demo(args.output_dir, quick=args.quick)
