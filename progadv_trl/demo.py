"""The built-in demo: a flight-booking agent's trajectories, tiny models trained on the spot, scored and evaluated.

What it does (``progadv demo``, a couple of minutes on a laptop CPU):

1. writes the bundled example trajectories (:func:`example_trajectories`: groups of 8 attempts at one booking task,
   successes and labelled failures) to ``<output_dir>/trajectories-{train,heldout}.jsonl``;
2. builds a byte-level BPE tokenizer and a tiny Qwen2 model, and trains the *reference* on every training attempt
   (a stand-in for a pretrained model that imitates good and bad behaviour alike);
3. trains the *policy* from the reference on the successful attempts only, with a KL penalty to the reference
   (a stand-in for KL-regularised RL: rejection-sampling fine-tuning);
4. scores the held-out groups with :class:`~progadv_trl.ProgressAdvantageScorer`, prints the metric table
   (progress advantage beside the baselines), and saves the scorer and the results.

It demonstrates the pipeline end to end on models trained in seconds; it is not the paper's experiment (that is the
agent-environment demo, where exact optimal advantages are known).
"""

from __future__ import annotations

import json
import random
import time
from pathlib import Path

from .data import Message, ToolCall, Trajectory

CITIES = ("Paris", "Rome", "Berlin", "Madrid", "Vienna", "Prague", "Lisbon", "Dublin", "Oslo", "Athens")
DAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")
SYSTEM = "You are a travel agent. Use the tools search_flights and book_flight. Book exactly what the user asks."
FAILURES = ("wrong_flight", "wrong_passengers", "wrong_date", "no_booking")


def _attempt(rng: random.Random, task: dict, outcome: str) -> tuple[list[Message], int | None]:
    a, b, day, n, flights = task["from"], task["to"], task["day"], task["passengers"], task["flights"]
    cheapest = min(flights, key=lambda f: f["price"])
    search_day = rng.choice([d for d in DAYS if d != day]) if outcome == "wrong_date" else day
    msgs = [Message("system", SYSTEM),
            Message("user", f"Book the cheapest flight from {a} to {b} on {day} for {n} people."),
            Message("assistant", f"I will search for flights from {a} to {b} on {search_day}.",
                    (ToolCall("search_flights", {"from": a, "to": b, "date": search_day}),)),
            Message("tool", json.dumps(flights))]
    if outcome == "no_booking":
        msgs.append(Message("assistant", f"Flight {cheapest['id']} looks good. Your trip is all set."))
        return msgs, 4
    pick = max(flights, key=lambda f: f["price"]) if outcome == "wrong_flight" else cheapest
    people = n + rng.choice([-1, 1]) if outcome == "wrong_passengers" and n > 1 else (
        n + 1 if outcome == "wrong_passengers" else n)
    say = (f"The cheapest flight is {pick['id']} at {pick['price']} euros. I book it for {people} people."
           if outcome in ("success", "wrong_date") else f"I book flight {pick['id']} for {people} people.")
    msgs += [Message("assistant", say, (ToolCall("book_flight", {"flight": pick["id"], "passengers": people}),)),
             Message("tool", f"booked {pick['id']} for {people}, confirmation C{rng.randint(1000, 9999)}"),
             Message("assistant", f"Done: flight {pick['id']} is booked for {people} people.")]
    mistake = {"success": None, "wrong_date": 2, "wrong_flight": 4, "wrong_passengers": 4}[outcome]
    return msgs, mistake


def example_trajectories(n_groups: int = 24, group_size: int = 8, seed: int = 0) -> list[Trajectory]:
    """Groups of ``group_size`` attempts at one booking task each; about 40% succeed, failures carry
    ``mistake_step`` (the message index of the decisive wrong action)."""
    rng = random.Random(seed)
    out = []
    for g in range(n_groups):
        a, b = rng.sample(CITIES, 2)
        flights = [{"id": f"{a[:2].upper()}{rng.randint(100, 999)}", "price": rng.randint(60, 400)} for _ in range(3)]
        task = {"from": a, "to": b, "day": rng.choice(DAYS), "passengers": rng.randint(1, 4), "flights": flights}
        for k in range(group_size):
            outcome = "success" if rng.random() < 0.4 else rng.choice(FAILURES)
            msgs, mistake = _attempt(rng, task, outcome)
            out.append(Trajectory(msgs, id=f"g{g}-{k}", group=f"g{g}", reward=float(outcome == "success"),
                                  mistake_step=mistake, metadata={"outcome": outcome}))
    return out


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


def run_demo(output_dir: str | Path = "progadv-demo", *, quick: bool = False, seed: int = 0) -> dict:
    """Run the demo and return its metric table (also written to ``<output_dir>/metrics.json``)."""
    import torch

    from .loaders import save_trajectories
    from .metrics import format_table
    from .rendering import TrajectoryTokenizer
    from .scorer import ProgressAdvantageScorer
    from .tiny import build_model, build_tokenizer, perturbed_copy

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


def flight_prompts(n: int = 32, seed: int = 2) -> list[dict]:
    """Single-turn GRPO prompts from the booking task (system, user request and search results in the prompt), with
    the ``cheapest`` flight id as a column for :func:`reward_books_cheapest`."""
    rows = []
    for t in example_trajectories(n_groups=n, group_size=1, seed=seed):
        flights = next(json.loads(m.content) for m in t.messages if m.role == "tool" and m.content.startswith("["))
        rows.append({"prompt": [m.to_chat() for m in t.messages[:2]]
                     + [{"role": "user", "content": "Search results: " + json.dumps(flights)}],
                     "cheapest": min(flights, key=lambda f: f["price"])["id"]})
    return rows


def reward_books_cheapest(completions, cheapest, **kwargs) -> list[float]:
    """GRPO reward: 1.0 when the reply names the cheapest flight's id."""
    texts = [c[0]["content"] if isinstance(c, list) else c for c in completions]
    return [float(fid in text) for text, fid in zip(texts, cheapest)]
