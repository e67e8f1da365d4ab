"""Sparse (P sampled points) vs dense hypercolumn training step: peak memory and time.

Larsson et al. (ECCV 2016) train the hypercolumn colorizer on a few sampled pixels per image instead
of the dense upsampled hypercolumn. This measures what that buys for one SGD step (forward,
cross-entropy on random 313-bin targets, backward, update) of ``vgg16_hypercolumn``.

Every measurement runs in a fresh subprocess, alternating sparse and dense ``--repeats`` times:
* CUDA: ``torch.cuda.max_memory_allocated`` during the first step, minus the allocation before it.
* CPU: peak resident set size (``ru_maxrss``) after the first step minus the RSS just before it,
  i.e. the step's extra memory (activations kept for backward, gradients, temporaries); the model
  weights and input already exist before. glibc returns large blocks to the OS on free, so the
  first step is not hidden by an earlier peak (the script checks that the peak did move).
A warm-up step on a 64px input (same mode) comes first so one-off library initialisation is not
counted. Time is the median of ``--steps`` further steps in the same process.

    python bench/bench_hypercolumn_memory.py --size 176 --batch 4 --points 128
"""
import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path


def _rss_bytes() -> int:
    with open('/proc/self/statm') as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def child(args):
    import torch
    import torch.nn.functional as F
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without install
    from pretext.models import create_model

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    dev = torch.device('cuda' if torch.cuda.is_available() else 'cpu')
    model = create_model('vgg16_hypercolumn', width_mult=args.width_mult, fc_dim=args.fc_dim,
                         hidden=args.hidden, dense_chunk=args.dense_chunk).to(dev).train()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    B, S, P = args.batch, args.size, args.points
    L = torch.rand(B, 1, S, S, device=dev) * 100
    if args.mode == 'sparse':
        points = torch.rand(B, P, 2, device=dev) * 2 - 1
        target = torch.randint(0, 313, (B, P, 1), device=dev)
    else:
        points = None
        target = torch.randint(0, 313, (B, S, S), device=dev)

    def step():
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(L, points), target)
        loss.backward()
        opt.step()
        if dev.type == 'cuda':
            torch.cuda.synchronize()

    # warm-up on a tiny input of the same mode: one-off library/kernel initialisation is not the step's
    small = torch.rand(B, 1, 64, 64, device=dev) * 100
    warm_pts = None if points is None else points[:, :1]
    F.cross_entropy(model(small, warm_pts).flatten(2).mean(2), torch.zeros(B, dtype=torch.long, device=dev)).backward()
    del small

    if dev.type == 'cuda':
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        step()
        peak = torch.cuda.max_memory_allocated() - before
        peak_moved = True
    else:
        before = _rss_bytes()
        maxrss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        step()
        maxrss_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        peak = maxrss_after - before
        peak_moved = maxrss_after > maxrss_before
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    print(json.dumps(dict(mode=args.mode, device=dev.type, peak_bytes=peak, peak_moved=peak_moved,
                          step_s=statistics.median(times))))


def main():
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--size', type=int, default=176)
    p.add_argument('--batch', type=int, default=4)
    p.add_argument('--points', type=int, default=128)
    p.add_argument('--width-mult', type=float, default=0.25)
    p.add_argument('--fc-dim', type=int, default=512)
    p.add_argument('--hidden', type=int, default=256)
    p.add_argument('--dense-chunk', type=int, default=16384)
    p.add_argument('--repeats', type=int, default=3)
    p.add_argument('--steps', type=int, default=2)
    p.add_argument('--threads', type=int, default=1)
    p.add_argument('--mode', choices=['sparse', 'dense'], help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.mode:
        return child(args)

    print(f'vgg16_hypercolumn width_mult={args.width_mult} fc_dim={args.fc_dim} hidden={args.hidden} '
          f'{args.size}px batch {args.batch}, sparse P={args.points} vs dense ({args.size}x{args.size} px)')
    res = {'sparse': [], 'dense': []}
    argv = sys.argv[1:]
    for r in range(args.repeats):
        for mode in ('sparse', 'dense'):
            proc = subprocess.run([sys.executable, __file__, *argv, '--mode', mode], capture_output=True, text=True)
            if proc.returncode:
                sys.exit(f'{mode} run failed:\n{proc.stderr}')
            out = proc.stdout
            d = json.loads(out.strip().splitlines()[-1])
            res[mode].append(d)
            flag = '' if d['peak_moved'] else '  (peak did not move: lower bound)'
            print(f"run {r} {mode:6s} [{d['device']}] step peak {d['peak_bytes'] / 2**20:8.1f} MiB  "
                  f"time {d['step_s'] * 1e3:8.1f} ms{flag}", flush=True)
    med = {m: (statistics.median(x['peak_bytes'] for x in v), statistics.median(x['step_s'] for x in v))
           for m, v in res.items()}
    for m, (mem, t) in med.items():
        print(f'median {m:6s}: peak {mem / 2**20:8.1f} MiB, step {t * 1e3:8.1f} ms')
    print(f"dense/sparse: memory x{med['dense'][0] / max(med['sparse'][0], 1):.1f}, "
          f"time x{med['dense'][1] / med['sparse'][1]:.1f}")


if __name__ == '__main__':
    main()
