"""Peak extra memory of scoring completions with gradients: model.token_logprobs forward + backward.

    python benchmarks/bench_scoring_memory.py                  # N = 8192 tokens, d = 896, V = 151936 (Qwen2.5-0.5B)
    python benchmarks/bench_scoring_memory.py --n 4096 --vocab 20000

Two ways, each in its own child process (so one's high-water mark cannot hide the other's):
- naive: chunked forward through autograd, as a straightforward implementation writes it: every chunk's float32
  logits stay alive for backward, i.e. (N, V) float32 in total;
- bounded: model.token_logprobs, whose backward recomputes each chunk's logits (about one (chunk, V) tensor).
Each child builds hidden (N, d) and the head (V, d) first, then reports the growth of its peak resident memory
(ru_maxrss) over forward + backward. CPU, float32. Needs about 6 GiB free for the naive child at the defaults.
"""

import argparse
import os
import resource
import subprocess
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import model as model_lib  # noqa: E402


def naive_logprobs(hidden, head, targets, chunk):
    """The pre-bounded form: by chunks in forward, but autograd keeps each chunk's logits for backward."""
    out = []
    for i in range(0, hidden.shape[0], chunk):
        logits = head(hidden[i:i + chunk]).float()  # (chunk, V), saved by logsumexp for backward
        out.append(logits.gather(-1, targets[i:i + chunk, None]).squeeze(-1) - logits.logsumexp(-1))
    return torch.cat(out)


def peak_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def child(a):
    torch.manual_seed(0)
    head = torch.nn.Linear(a.dim, a.vocab, bias=False)
    hidden = torch.randn(a.n, a.dim, requires_grad=True)
    targets = torch.randint(0, a.vocab, (a.n,))
    head.weight.grad = torch.zeros_like(head.weight)  # the gradient buffers exist before (training keeps them)
    hidden.grad = torch.zeros_like(hidden)
    before = peak_gib()
    if a.child == "naive":
        logp = naive_logprobs(hidden, head, targets, a.chunk)
    else:
        logp = model_lib.token_logprobs(hidden, head, targets, chunk=a.chunk)
    logp.sum().backward()
    print(f"{peak_gib() - before:.3f}")


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--n", type=int, default=8192, help="scored tokens N")
    p.add_argument("--dim", type=int, default=896, help="hidden size d")
    p.add_argument("--vocab", type=int, default=151936, help="vocabulary V")
    p.add_argument("--chunk", type=int, default=512, help="rows per chunk (model.token_logprobs default)")
    p.add_argument("--child", default=None, choices=["naive", "bounded"], help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        return child(a)
    print(f"N = {a.n} tokens, d = {a.dim}, V = {a.vocab}, chunk = {a.chunk}, float32; (N, V) float32 is "
          f"{a.n * a.vocab * 4 / 2**30:.2f} GiB, the head's gradient {a.vocab * a.dim * 4 / 2**30:.2f} GiB "
          "(allocated before measuring)")
    extra = {}
    for way in ("naive", "bounded"):
        r = subprocess.run([sys.executable, __file__, "--child", way, "--n", str(a.n), "--dim", str(a.dim),
                            "--vocab", str(a.vocab), "--chunk", str(a.chunk)], capture_output=True, text=True)
        if r.returncode != 0:
            sys.exit(f"the {way} child failed:\n{r.stderr[-2000:]}")
        extra[way] = float(r.stdout.split()[-1])
    print(f"peak extra memory: naive {extra['naive']:.2f} GiB, bounded {extra['bounded']:.2f} GiB")


if __name__ == "__main__":
    main()
