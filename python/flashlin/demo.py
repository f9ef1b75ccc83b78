"""`python -m flashlin demo`: train a small byte-level language model, save it, plot the loss and
generate a sample.

The corpus is `--text FILE`, else the licence texts of /usr/share/common-licenses (on every
Debian machine), else the Python standard library's own sources. Bytes are the tokens (vocabulary
256), so nothing needs a tokenizer. The run reports the corpus's unigram entropy (what a model
that ignores the context achieves) beside the final held-out loss: a model that learned anything
from the context lands well below it.
"""
import argparse
import math
import os
import sys
import time

import torch
import torch.nn.functional as F

from .models import MIXERS, LanguageModel, LMConfig

LICENSES = "/usr/share/common-licenses"
DEFAULT_PROMPT = "This License"


# --- corpus ---------------------------------------------------------------------------------------
def load_corpus(path=None, limit=4 << 20):
    """(bytes, description). `path`: a text file; None: the Debian licence texts, else the
    Python standard library's sources (at most `limit` bytes)."""
    if path is not None:
        with open(path, "rb") as f:
            data = f.read()
        if len(data) < 1024:
            raise ValueError(f"--text {path}: {len(data)} bytes; need at least 1024")
        return data, f"{path} ({len(data):,} bytes)"
    if os.path.isdir(LICENSES):
        names = sorted(n for n in os.listdir(LICENSES)
                       if os.path.isfile(os.path.join(LICENSES, n))
                       and not os.path.islink(os.path.join(LICENSES, n)))
        parts = []
        for name in names:
            with open(os.path.join(LICENSES, name), "rb") as f:
                parts.append(f.read())
        data = b"\n\n".join(parts)
        if len(data) >= 64 << 10:
            return data[:limit], f"{LICENSES} ({len(names)} files, {len(data):,} bytes)"
    root = os.path.dirname(os.__file__)
    parts, size = [], 0
    for directory, subdirs, files in os.walk(root):
        subdirs[:] = sorted(d for d in subdirs if d not in ("site-packages", "dist-packages",
                                                            "test", "tests", "__pycache__"))
        for name in sorted(files):
            if name.endswith(".py") and size < limit:
                with open(os.path.join(directory, name), "rb") as f:
                    parts.append(f.read())
                size += len(parts[-1])
    data = b"\n".join(parts)[:limit]
    return data, f"Python standard library sources in {root} ({len(data):,} bytes)"


def split_corpus(tokens, block=4096, every=10):
    """(training, held-out): every `every`-th block of `block` tokens is held out, so that both
    parts sample the whole corpus (a corpus shorter than `every` blocks: its last tenth)."""
    blocks = list(tokens.split(block))
    if len(blocks) < every:
        cut = int(tokens.numel() * 0.9)
        return tokens[:cut], tokens[cut:]
    held = [b for i, b in enumerate(blocks) if i % every == every // 2]
    kept = [b for i, b in enumerate(blocks) if i % every != every // 2]
    return torch.cat(kept), torch.cat(held)


def unigram_entropy(tokens, vocab_size=256):
    """Entropy of the token frequencies, in nats per token."""
    counts = torch.bincount(tokens, minlength=vocab_size).double()
    p = counts[counts > 0] / counts.sum()
    return float(-(p * p.log()).sum())


def random_batch(data, batch_size, seq_len, generator, device):
    starts = torch.randint(0, data.numel() - seq_len - 1, (batch_size,), generator=generator)
    index = starts[:, None] + torch.arange(seq_len + 1)
    chunk = data[index].to(device)
    return chunk[:, :-1], chunk[:, 1:]


@torch.no_grad()
def evaluate(model, data, batch_size, seq_len, device, max_batches=8):
    """Mean next-token loss (nats) over up to `max_batches` x `batch_size` evenly spaced windows
    of the held-out data."""
    model.eval()
    count = min(max_batches * batch_size, max(1, (data.numel() - 1) // seq_len))
    last_start = max(0, data.numel() - seq_len - 1)
    starts = torch.linspace(0, last_start, count).long()
    total, tokens = 0.0, 0
    for i in range(0, count, batch_size):
        index = starts[i:i + batch_size, None] + torch.arange(min(seq_len + 1, data.numel()))
        chunk = data[index].to(device)
        logits = model(chunk[:, :-1])
        total += float(F.cross_entropy(logits.flatten(0, 1), chunk[:, 1:].flatten(),
                                       reduction="sum"))
        tokens += chunk[:, 1:].numel()
    model.train()
    return total / tokens


# --- progress and plots ---------------------------------------------------------------------------
class Progress:
    """One line rewritten in place (\\r) on a terminal, a line every `every` steps otherwise."""

    def __init__(self, total, every, stream=None):
        self.total, self.every = total, max(1, every)
        self.stream = stream or sys.stdout
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.width = 0

    def update(self, step, text):
        if self.tty:
            line = f"step {step:>{len(str(self.total))}}/{self.total}  {text}"
            self.stream.write("\r" + line.ljust(self.width))
            self.width = len(line)
            self.stream.flush()
        elif step % self.every == 0 or step == self.total:
            self.stream.write(f"step {step:>{len(str(self.total))}}/{self.total}  {text}\n")
            self.stream.flush()

    def close(self):
        if self.tty and self.width:
            self.stream.write("\n")
            self.stream.flush()


def save_loss_plot(path, steps, losses, baseline=None, eval_points=(), title="training loss"):
    """PNG of the loss curve (matplotlib; scripts/setup.sh installs it). Returns a sentence
    saying where it went, or why there is none."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "no loss plot: matplotlib is not installed (Debian: apt-get install python3-matplotlib)"
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    ax.plot(steps, losses, color="tab:blue", linewidth=1, label="training loss")
    if eval_points:
        ax.plot([s for s, _ in eval_points], [v for _, v in eval_points], "o",
                color="tab:green", label="held-out loss")
    if baseline is not None:
        ax.axhline(baseline, color="tab:red", linestyle="--", label="unigram entropy")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats / byte)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return f"loss plot: {path}"


# --- command line ---------------------------------------------------------------------------------
def pick_device(name):
    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() and _has_cuda() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not (torch.cuda.is_available() and _has_cuda()):
        raise SystemExit("--device cuda: no CUDA device, or libflashlin was built without CUDA")
    return device


def _has_cuda():
    from . import has_cuda
    return has_cuda()


def mixer_argument(value):
    if value in MIXERS:
        return value
    raise argparse.ArgumentTypeError(f"unknown mixer {value!r}; available: {', '.join(MIXERS)}")


def build_parser(parser=None):
    parser = parser or argparse.ArgumentParser(prog="python -m flashlin demo")
    parser.description = ("Train a small byte-level language model with a flashlin mixer, save "
                          "a checkpoint and a loss plot, and generate a sample.")
    parser.add_argument("--mixer", type=mixer_argument, default="gla",
                        help=f"token mixer: {', '.join(MIXERS)}")
    parser.add_argument("--steps", type=int, default=250, help="training steps (250)")
    parser.add_argument("--seq-len", type=int, default=128, help="tokens per sequence (128)")
    parser.add_argument("--batch-size", type=int, default=16, help="sequences per step (16)")
    parser.add_argument("--layers", type=int, default=2, help="blocks (2)")
    parser.add_argument("--hidden", type=int, default=256, help="hidden size (256)")
    parser.add_argument("--heads", type=int, default=4, help="heads per mixer (4)")
    parser.add_argument("--lr", type=float, default=3e-3, help="peak learning rate (3e-3)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (0)")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default: "
                                                         "cuda when available)")
    parser.add_argument("--out", default="flashlin-demo", help="output directory "
                                                               "(./flashlin-demo)")
    parser.add_argument("--text", default=None, help="train on this text file instead")
    parser.add_argument("--prompt", default=DEFAULT_PROMPT, help="prompt of the sample")
    parser.add_argument("--sample-tokens", type=int, default=300, help="bytes to generate (300)")
    parser.add_argument("--temperature", type=float, default=0.8,
                        help="sampling temperature (0.8; 0 = greedy)")
    parser.add_argument("--top-k", type=int, default=40, help="sample among the top k (40)")
    parser.add_argument("--log-every", type=int, default=None,
                        help="progress line every N steps when not on a terminal "
                             "(default: steps / 20)")
    parser.add_argument("--eval-batches", type=int, default=8,
                        help="held-out batches for the final evaluation (8)")
    return parser


def lr_at(step, steps, peak, warmup):
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def run(args):
    torch.manual_seed(args.seed)
    device = pick_device(args.device)
    for name in ("steps", "seq_len", "batch_size", "layers", "hidden", "heads"):
        if getattr(args, name) < 1:
            raise SystemExit(f"--{name.replace('_', '-')} must be >= 1")
    data, description = load_corpus(args.text)
    train, held_out = split_corpus(torch.frombuffer(bytearray(data), dtype=torch.uint8).long())
    if held_out.numel() < args.seq_len + 2 or train.numel() < args.seq_len + 2:
        raise SystemExit(f"corpus too small for --seq-len {args.seq_len}")
    entropy = unigram_entropy(train)
    print(f"corpus: {description}; {train.numel():,} training / {held_out.numel():,} held-out "
          f"bytes")
    print(f"unigram entropy: {entropy:.3f} nats/byte = {entropy / math.log(2):.3f} bits/byte")

    config = LMConfig(vocab_size=256, hidden_size=args.hidden, num_layers=args.layers,
                      num_heads=args.heads, mixer=args.mixer)
    model = LanguageModel(config).to(device)
    print(f"model: {args.mixer}, {args.layers} layers, hidden {args.hidden}, {args.heads} heads, "
          f"{model.num_parameters():,} parameters; device {device}")
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1},
                                   {"params": no_decay, "weight_decay": 0.0}],
                                  lr=args.lr, betas=(0.9, 0.95))
    generator = torch.Generator().manual_seed(args.seed)
    warmup = max(1, min(30, args.steps // 10))
    progress = Progress(args.steps, args.log_every or max(1, args.steps // 20))
    steps, losses = [], []
    smoothed = None
    start = time.time()
    tokens_seen = 0
    model.train()
    for step in range(args.steps):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, args.steps, args.lr, warmup)
        x, y = random_batch(train, args.batch_size, args.seq_len, generator, device)
        logits = model(x)
        loss = F.cross_entropy(logits.flatten(0, 1), y.flatten())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        value = loss.item()
        if not math.isfinite(value):
            progress.close()
            raise SystemExit(f"step {step + 1}: the loss is {value}; try a lower --lr")
        tokens_seen += x.numel()
        steps.append(step + 1)
        losses.append(value)
        smoothed = value if smoothed is None else 0.9 * smoothed + 0.1 * value
        elapsed = time.time() - start
        progress.update(step + 1, f"loss {value:.3f} (avg {smoothed:.3f})  "
                                  f"{tokens_seen / max(elapsed, 1e-9):,.0f} tokens/s  "
                                  f"{elapsed:.0f}s")
    progress.close()
    train_time = time.time() - start
    eval_loss = evaluate(model, held_out, args.batch_size, args.seq_len, device,
                         args.eval_batches)
    print(f"trained {args.steps} steps in {train_time:.1f}s "
          f"({tokens_seen / max(train_time, 1e-9):,.0f} tokens/s)")
    print(f"held-out loss: {eval_loss:.3f} nats/byte = {eval_loss / math.log(2):.3f} bits/byte "
          f"(unigram entropy {entropy:.3f} nats = {entropy / math.log(2):.3f} bits; "
          f"{'below' if eval_loss < entropy else 'NOT below'} it by "
          f"{abs(entropy - eval_loss) / math.log(2):.2f} bits/byte)")

    os.makedirs(args.out, exist_ok=True)
    checkpoint = os.path.join(args.out, "checkpoint")
    weights = model.save_pretrained(checkpoint)
    print(f"checkpoint: {checkpoint} ({os.path.basename(weights)}, config.json; load with "
          f"flashlin.models.LanguageModel.from_pretrained)")
    with open(os.path.join(args.out, "losses.csv"), "w") as f:
        f.write("step,loss\n" + "".join(f"{s},{v:.6f}\n" for s, v in zip(steps, losses)))
    print(save_loss_plot(os.path.join(args.out, "loss.png"), steps, losses, entropy,
                         [(args.steps, eval_loss)], title=f"flashlin demo: {args.mixer}"))

    prompt = args.prompt.encode("utf-8") or b"\n"
    ids = torch.tensor([list(prompt)], dtype=torch.long, device=device)
    sample_gen = torch.Generator(device=device).manual_seed(args.seed)
    start = time.time()
    out = model.generate(ids, args.sample_tokens, temperature=args.temperature,
                         top_k=args.top_k, generator=sample_gen)
    gen_time = time.time() - start
    text = bytes(out[0].tolist()).decode("utf-8", errors="replace")
    with open(os.path.join(args.out, "sample.txt"), "w") as f:
        f.write(text + "\n")
    print(f"sample ({args.sample_tokens} bytes in {gen_time:.2f}s, temperature "
          f"{args.temperature}, top-k {args.top_k}):")
    print("-" * 72)
    print(text)
    print("-" * 72)
    return {"eval_loss": eval_loss, "unigram_entropy": entropy, "train_time": train_time,
            "losses": losses, "parameters": model.num_parameters(), "sample": text}


def main(argv=None):
    args = build_parser().parse_args(argv)
    run(args)
    return 0
