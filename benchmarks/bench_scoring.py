"""End-to-end scoring speed: ProgressAdvantageScorer vs the straightforward approach, on a shared-prompt workload.

    python benchmarks/bench_scoring.py                       # defaults below, about 2 minutes on 2 CPU cores
    python benchmarks/bench_scoring.py --groups 2 --prompt-tokens 512 --vocab 16384 --repeats 1   # quick look

Workload: ``--groups`` best-of-8 groups; in each, 8 trajectories share one long prompt (``--prompt-tokens``), then
take ``--steps`` actions (``--action-tokens`` each) answered by tool outputs (``--tool-tokens`` each). Models: two
randomly initialised Qwen2 models of the given size (policy and reference), saved and loaded like checkpoints.

* straightforward: for each padded batch of 8, two plain forwards with full ``[B, L, V]`` logits, ``log_softmax``,
  gather of the target log-probs, exact KL and entropy from the full distributions;
* ours: ``ProgressAdvantageScorer.score`` (length-sorted batches, hidden states only, the fused kernel at the action
  tokens, every baseline statistic included).

Prints tokens per second (all tokens of all trajectories), peak RSS growth in a fresh subprocess per method, and the
largest difference of the step advantages between the two.
"""

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def build(args, root):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from progadv_trl.tiny import build_tokenizer

    tok = build_tokenizer()
    for name, seed in (("policy", 1), ("reference", 2)):
        import torch

        torch.manual_seed(seed)
        cfg = Qwen2Config(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=4 * args.hidden,
                          num_hidden_layers=args.layers, num_attention_heads=max(1, args.hidden // 64),
                          num_key_value_heads=max(1, args.hidden // 128), max_position_embeddings=8192,
                          tie_word_embeddings=False, pad_token_id=tok.pad_token_id)
        Qwen2ForCausalLM(cfg).save_pretrained(os.path.join(root, name))
        tok.save_pretrained(os.path.join(root, name))


def workload(args):
    import random

    from progadv_trl.data import Message, Trajectory

    rng = random.Random(0)
    words = "search book flight price cheapest city date passengers confirm result tool order cancel".split()

    def text(n):  # about one token per word for this tokenizer's frequent words
        return " ".join(rng.choice(words) for _ in range(n))

    out = []
    for g in range(args.groups):
        prompt = text(args.prompt_tokens)
        for k in range(8):
            msgs = [Message("system", "You are an agent."), Message("user", prompt)]
            for _ in range(args.steps):
                msgs += [Message("assistant", text(args.action_tokens)), Message("tool", text(args.tool_tokens))]
            out.append(Trajectory(msgs, id=f"g{g}-{k}", group=f"g{g}", reward=float(k % 2)))
    return out


def run_ours(root, trajs, repeats):
    from progadv_trl import ProgressAdvantageScorer

    scorer = ProgressAdvantageScorer.from_models(os.path.join(root, "policy"), os.path.join(root, "reference"),
                                                 batch_size=8)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        res = scorer.score(trajs)
        times.append(time.perf_counter() - t)
    return times, [[s.advantage for s in r.steps] for r in res]


def run_straightforward(root, trajs, repeats):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from progadv_trl.rendering import TrajectoryTokenizer

    tok = AutoTokenizer.from_pretrained(os.path.join(root, "policy"))
    pol = AutoModelForCausalLM.from_pretrained(os.path.join(root, "policy")).eval()
    ref = AutoModelForCausalLM.from_pretrained(os.path.join(root, "reference")).eval()
    render = TrajectoryTokenizer(tok)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        advs = []
        for i in range(0, len(trajs), 8):
            toks = [render(x) for x in trajs[i:i + 8]]
            width = max(len(x.input_ids) for x in toks)
            ids = torch.full((len(toks), width), tok.pad_token_id)
            mask = torch.zeros_like(ids)
            for r, x in enumerate(toks):
                ids[r, :len(x.input_ids)] = torch.tensor(x.input_ids)
                mask[r, :len(x.input_ids)] = 1
            with torch.no_grad():
                lp = torch.log_softmax(pol(input_ids=ids, attention_mask=mask).logits[:, :-1].float(), -1)
                lr = torch.log_softmax(ref(input_ids=ids, attention_mask=mask).logits[:, :-1].float(), -1)
                tgt = ids[:, 1:, None]
                p_lp, r_lp = lp.gather(-1, tgt).squeeze(-1), lr.gather(-1, tgt).squeeze(-1)
                p = lp.exp()
                kl = (p * (lp - lr)).sum(-1)  # noqa: F841  (the same outputs as ours: KL and entropy too)
                ent = -(p * lp).sum(-1)  # noqa: F841
                del p, lp, lr
            for r, x in enumerate(toks):
                step = torch.tensor(x.step_index[1:])
                diff = (p_lp[r, :len(step)] - r_lp[r, :len(step)]).double()
                advs.append([diff[step == s].sum().item() for s in range(len(x.steps))])
        times.append(time.perf_counter() - t)
    return times, advs


def child(method, root, args):
    trajs = workload(args)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    times, advs = (run_ours if method == "ours" else run_straightforward)(root, trajs, args.repeats)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"times": times, "peak_mib": (peak - before) / 1024, "advs": advs}))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--groups", type=int, default=4)
    p.add_argument("--prompt-tokens", type=int, default=512)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--action-tokens", type=int, default=48)
    p.add_argument("--tool-tokens", type=int, default=96)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--vocab", type=int, default=32768)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--child", default=None)
    p.add_argument("--root", default=None)
    args = p.parse_args()
    if args.child:
        return child(args.child, args.root, args)
    import torch

    from progadv_trl.rendering import TrajectoryTokenizer
    from progadv_trl.tiny import build_tokenizer

    root = tempfile.mkdtemp(prefix="bench-scoring-")
    build(args, root)
    trajs = workload(args)
    render = TrajectoryTokenizer(build_tokenizer())
    toks = [render(t) for t in trajs]
    n_tokens = sum(len(t.input_ids) for t in toks)
    n_action = sum(sum(1 for s in t.step_index if s >= 0) for t in toks)
    out = {}
    for method in ("straightforward", "ours"):
        cmd = [sys.executable, __file__, "--child", method, "--root", root] + [
            f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items() if k not in ("child", "root")]
        res = subprocess.run(cmd, capture_output=True, text=True, check=True)
        out[method] = json.loads(res.stdout.strip().splitlines()[-1])
    err = max(abs(a - b) for x, y in zip(out["ours"]["advs"], out["straightforward"]["advs"]) for a, b in zip(x, y))
    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), "?")
    print(f"machine: {cpu}, {os.cpu_count()} cores, torch {torch.__version__} ({torch.get_num_threads()} threads), "
          f"{platform.python_version()}")
    print(f"workload: {len(trajs)} trajectories in {args.groups} groups of 8, {n_tokens} tokens "
          f"({n_action} action tokens), model hidden {args.hidden} x {args.layers} layers, vocab {args.vocab}\n")
    print("| method | median s | tokens/s | speed-up | peak RSS growth (MiB) |")
    print("|---|---|---|---|---|")
    base = sorted(out["straightforward"]["times"])[len(out["straightforward"]["times"]) // 2]
    for method in ("straightforward", "ours"):
        t = sorted(out[method]["times"])[len(out[method]["times"]) // 2]
        print(f"| {method} | {t:.2f} | {n_tokens / t:,.0f} | {base / t:.2f}x | {out[method]['peak_mib']:,.0f} |")
    print(f"\nmax |step advantage difference| between the two: {err:.2e}")


if __name__ == "__main__":
    main()
