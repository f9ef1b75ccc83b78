"""`python -m flashlin recall`: multi-query associative recall (MQAR; Arora et al. 2023, "Zoology:
Measuring and Improving Recall in Efficient Language Models", https://arxiv.org/abs/2312.04927).

Each sequence lists `pairs` key-value pairs (k1 v1 k2 v2 ...), then asks `queries` of those keys
again, each followed by its value (q1 a1 q2 a2 ...). The model is trained on, and scored by, its
predictions of the answers a_i only (the token after each query key): it has to have stored the
pairs in its recurrent state. Keys and values come from disjoint ranges of the vocabulary; a
model that ignores the context scores about 1/num_values. Every mixer is trained briefly with the
same width and state size (expand_k = expand_v = 1: a state of heads x (hidden/heads)^2 floats
per layer) and the held-out accuracies are printed as a table.
"""
import argparse
import math
import time

import torch
import torch.nn.functional as F

from .demo import Progress, mixer_argument, pick_device
from .models import MIXERS, LanguageModel, LMConfig


def mqar_batch(batch_size, pairs, queries, num_keys, num_values, generator, device="cpu"):
    """(inputs [B, L-1], targets [B, L-1], mask [B, L-1]) with L = 2 (pairs + queries); mask
    marks the answer positions. Token 0 is unused; keys are 1..num_keys, values follow."""
    if pairs > num_keys:
        raise ValueError(f"pairs ({pairs}) must be <= num_keys ({num_keys})")
    if queries > pairs:
        raise ValueError(f"queries ({queries}) must be <= pairs ({pairs})")
    keys = torch.rand(batch_size, num_keys, generator=generator).argsort(-1)[:, :pairs] + 1
    values = torch.randint(0, num_values, (batch_size, pairs), generator=generator) + 1 + num_keys
    context = torch.stack([keys, values], -1).flatten(1)
    asked = torch.rand(batch_size, pairs, generator=generator).argsort(-1)[:, :queries]
    question = torch.stack([keys.gather(1, asked), values.gather(1, asked)], -1).flatten(1)
    sequence = torch.cat([context, question], 1)
    mask = torch.zeros_like(sequence, dtype=torch.bool)
    mask[:, 2 * pairs + 1::2] = True  # the answers
    return (sequence[:, :-1].to(device), sequence[:, 1:].to(device), mask[:, 1:].to(device))


def train_mixer(mixer, args, device, log=print):
    """Train one mixer on MQAR; returns a dict of results."""
    torch.manual_seed(args.seed)
    vocab = 1 + args.num_keys + args.num_values
    kwargs = {}
    if mixer == "rwkv6":
        rank = max(4, args.hidden // 8)
        kwargs = {"proj_low_rank_dim": rank, "gate_low_rank_dim": rank}
    config = LMConfig(vocab_size=vocab, hidden_size=args.hidden, num_layers=args.layers,
                      num_heads=args.heads, mixer=mixer, mlp_ratio=2, expand_k=1.0,
                      expand_v=1.0, use_short_conv=not args.no_short_conv, mixer_kwargs=kwargs,
                      tie_word_embeddings=False)
    model = LanguageModel(config).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.1)
    generator = torch.Generator().manual_seed(args.seed)
    progress = Progress(args.steps, args.log_every or max(1, args.steps // 5))
    start, loss_value = time.time(), float("nan")
    warmup = max(1, args.steps // 10)
    for step in range(args.steps):
        scale = (step + 1) / warmup if step < warmup else 0.5 * (
            1 + math.cos(math.pi * (step - warmup) / max(1, args.steps - warmup)))
        for group in optimizer.param_groups:
            group["lr"] = args.lr * scale
        x, y, mask = mqar_batch(args.batch_size, args.pairs, args.queries, args.num_keys,
                                args.num_values, generator, device)
        logits = model(x)
        loss = F.cross_entropy(logits[mask], y[mask])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        loss_value = loss.item()
        progress.update(step + 1, f"{mixer}: loss {loss_value:.3f}  "
                                  f"{time.time() - start:.0f}s")
    progress.close()
    accuracy = evaluate(model, args, device)
    state = args.heads * (args.hidden // args.heads) ** 2
    return {"mixer": mixer, "parameters": model.num_parameters(), "state": state,
            "loss": loss_value, "accuracy": accuracy, "time": time.time() - start}


@torch.no_grad()
def evaluate(model, args, device):
    model.eval()
    generator = torch.Generator().manual_seed(args.seed + 1_000_003)  # unseen sequences
    correct = total = 0
    for _ in range(args.eval_batches):
        x, y, mask = mqar_batch(args.batch_size, args.pairs, args.queries, args.num_keys,
                                args.num_values, generator, device)
        predicted = model(x).argmax(-1)
        correct += int((predicted[mask] == y[mask]).sum())
        total += int(mask.sum())
    model.train()
    return correct / max(total, 1)


def build_parser(parser=None):
    parser = parser or argparse.ArgumentParser(prog="python -m flashlin recall")
    parser.description = ("Multi-query associative recall (MQAR, Zoology): train each mixer "
                          "briefly at the same state size and print held-out accuracies.")
    parser.add_argument("--mixers", default=",".join(MIXERS),
                        help=f"comma-separated mixers ({','.join(MIXERS)})")
    parser.add_argument("--steps", type=int, default=400, help="training steps per mixer (400)")
    parser.add_argument("--batch-size", type=int, default=32, help="sequences per step (32)")
    parser.add_argument("--pairs", type=int, default=8, help="key-value pairs per sequence (8)")
    parser.add_argument("--queries", type=int, default=8, help="queries per sequence (8)")
    parser.add_argument("--num-keys", type=int, default=32, help="distinct keys (32)")
    parser.add_argument("--num-values", type=int, default=32, help="distinct values (32)")
    parser.add_argument("--hidden", type=int, default=64, help="hidden size (64)")
    parser.add_argument("--heads", type=int, default=2, help="heads (2)")
    parser.add_argument("--layers", type=int, default=2, help="blocks (2)")
    parser.add_argument("--lr", type=float, default=3e-3, help="peak learning rate (3e-3)")
    parser.add_argument("--no-short-conv", action="store_true",
                        help="no short convolutions before q/k/v (gla, retention, lightning)")
    parser.add_argument("--eval-batches", type=int, default=8, help="held-out batches (8)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (0)")
    parser.add_argument("--device", default="auto", help="cpu, cuda or auto")
    parser.add_argument("--log-every", type=int, default=None,
                        help="progress line every N steps when not on a terminal")
    return parser


def run(args):
    mixers = [m.strip() for m in args.mixers.split(",") if m.strip()]
    try:
        for m in mixers:
            mixer_argument(m)
    except argparse.ArgumentTypeError as error:
        raise SystemExit(f"--mixers: {error}")
    if not mixers:
        raise SystemExit("--mixers: no mixer given")
    for name in ("steps", "batch_size", "pairs", "queries", "num_keys", "num_values", "hidden",
                 "heads", "layers", "eval_batches"):
        if getattr(args, name) < 1:
            raise SystemExit(f"--{name.replace('_', '-')} must be >= 1")
    if args.pairs > args.num_keys or args.queries > args.pairs:
        raise SystemExit("need queries <= pairs <= num-keys")
    if args.hidden % args.heads:
        raise SystemExit("--hidden must be divisible by --heads")
    device = pick_device(args.device)
    length = 2 * (args.pairs + args.queries)
    print(f"MQAR: {args.pairs} pairs, {args.queries} queries, sequence length {length}, "
          f"{args.num_keys} keys, {args.num_values} values (chance {1 / args.num_values:.1%}); "
          f"hidden {args.hidden}, {args.heads} heads, {args.layers} layers, {args.steps} steps "
          f"x {args.batch_size}; device {device}")
    results = [train_mixer(m, args, device) for m in mixers]
    header = (f"{'mixer':<10} {'params':>8} {'state/layer':>11} {'train loss':>10} "
              f"{'accuracy':>8} {'time':>7}")
    print(header)
    print("-" * len(header))
    for r in results:
        print(f"{r['mixer']:<10} {r['parameters']:>8,} {r['state']:>11,} {r['loss']:>10.3f} "
              f"{r['accuracy']:>8.1%} {r['time']:>6.1f}s")
    return results


def main(argv=None):
    run(build_parser().parse_args(argv))
    return 0
