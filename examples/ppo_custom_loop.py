"""A small PPO loop of your own (value head, KL penalty in the reward, clipped objective) with the progadv monitor.

    python examples/ppo_custom_loop.py            # tiny model built on the spot, CPU, about a minute

TRL 1.16 has no PPOTrainer; teams run PPO in their own loop, verl or OpenRLHF. `ProgressAdvantageMonitor` is the
contract for them: three calls, marked `# progadv`. In verl, the same calls go in the trainer's `fit()` loop next to
`_validate()` (pass `actor_rollout_wg`'s HF module and the ref policy's module); in OpenRLHF, in the PPO trainer's
`evaluate()` hook, with the actor's and the initial model's `.model`.
"""

import argparse
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from progadv_trl import ProgressAdvantageConfig, ProgressAdvantageMonitor  # noqa: E402  # progadv
from progadv_trl.flight_example import example_trajectories, flight_prompts, reward_books_cheapest  # noqa: E402
from progadv_trl.tiny import build_model, build_tokenizer  # noqa: E402


def token_logprobs(model, ids, n_prompt):
    logits = model(input_ids=ids).logits[:, n_prompt - 1:-1].float()
    return torch.log_softmax(logits, -1).gather(-1, ids[:, n_prompt:, None]).squeeze(-1), logits


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output-dir", default="runs/ppo-progadv")
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--kl-coef", type=float, default=0.05)
    args = p.parse_args()
    torch.manual_seed(0)
    base = os.path.join(args.output_dir, "base")
    build_model(build_tokenizer(), base)
    tok = AutoTokenizer.from_pretrained(base)
    policy = AutoModelForCausalLM.from_pretrained(base)
    reference = AutoModelForCausalLM.from_pretrained(base).eval().requires_grad_(False)
    value_head = torch.nn.Linear(policy.config.hidden_size, 1)
    opt = torch.optim.AdamW([*policy.parameters(), *value_head.parameters()], lr=1e-3)
    monitor = ProgressAdvantageMonitor(reference, tok, ProgressAdvantageConfig(  # progadv
        beta=args.kl_coef, temperature=1.0), args.output_dir, heldout=example_trajectories(4, seed=1))
    rows = flight_prompts(n=64)
    for step in range(args.steps):
        if step % 4 == 0:
            m = monitor.evaluate(policy, step)  # progadv
            print(f"step {step}: AUROC {m['progadv/auroc']:.3f}  KL {m['progadv/kl/mean']:.4f}")
        row = rows[step % len(rows)]
        prompt = tok.apply_chat_template(row["prompt"], add_generation_prompt=True, return_tensors="pt",
                                         return_dict=True)["input_ids"].repeat(4, 1)
        n = prompt.shape[1]
        with torch.no_grad():
            ids = policy.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), do_sample=True,
                                  max_new_tokens=12, pad_token_id=tok.pad_token_id)
            old_lp, _ = token_logprobs(policy, ids, n)
            ref_lp, _ = token_logprobs(reference, ids, n)
            texts = tok.batch_decode(ids[:, n:], skip_special_tokens=True)
            score = torch.tensor(reward_books_cheapest(texts, [row["cheapest"]] * len(texts)))
            rewards = -args.kl_coef * (old_lp - ref_lp)  # KL penalty per token ...
            rewards[:, -1] += score  # ... and the task reward at the end
            hidden = policy(input_ids=ids, output_hidden_states=True).hidden_states[-1][:, n - 1:-1]
            values = value_head(hidden).squeeze(-1)
            returns = rewards.flip(-1).cumsum(-1).flip(-1)  # gamma = lambda = 1
            adv = returns - values
            adv = (adv - adv.mean()) / (adv.std() + 1e-6)
        for _ in range(2):
            lp, _ = token_logprobs(policy, ids, n)
            ratio = torch.exp(lp - old_lp)
            pg = -torch.min(ratio * adv, ratio.clamp(0.8, 1.2) * adv).mean()
            hidden = policy(input_ids=ids, output_hidden_states=True).hidden_states[-1][:, n - 1:-1]
            vloss = F.mse_loss(value_head(hidden).squeeze(-1), returns)
            opt.zero_grad()
            (pg + 0.5 * vloss).backward()
            opt.step()
    m = monitor.evaluate(policy, args.steps)  # progadv
    print(f"step {args.steps}: AUROC {m['progadv/auroc']:.3f}  KL {m['progadv/kl/mean']:.4f}")
    print(f"scorer exported to {monitor.export(policy)}")  # progadv


if __name__ == "__main__":
    main()
