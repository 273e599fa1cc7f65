"""No n x n buffer, checked the hard way: vtc's own computations under an address-space limit below n x n.

    python eval/memory_probe.py --n 16384 --limit-mib 512                  # every pre-LLM image method
    python eval/memory_probe.py --n 12288 --limit-mib 256 --methods divprune,visionzip

One process: the inputs are built first (the kernels' ``[1, n, d]`` tensors, each method's synthetic image from
``bench_scaling.synthetic_image``, budget ``--budget``), then ``RLIMIT_AS`` is set to the process's current
address space plus ``--limit-mib``, which is less than one ``n x n`` fp32 matrix; glibc returns freed blocks to
the OS (so the limit measures what is live, not what the allocator keeps). Then the kernel references
(``cosine_argmax``, ``attention_received``, ``nearest_distance``) and each method's ``reduce`` run in turn; an
allocation past the limit raises, and the script reports it and exits 1. Prints each call's time.
"""

from __future__ import annotations

import argparse
import ctypes
import resource
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_scaling  # noqa: E402


def _address_space() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    raise OSError("VmSize not in /proc/self/status")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, default=16384)
    p.add_argument("--limit-mib", type=int, default=512, help="address space allowed on top of the inputs")
    p.add_argument("--methods", default=None, help="comma-separated; default every pre-LLM image method; 'none'")
    p.add_argument("--budget", type=float, default=0.02)
    p.add_argument("--dim", type=int, default=64)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    import vtc
    from vtc.kernels import reference

    n = args.n
    if n * n * 4 <= args.limit_mib * 2**20:
        p.error(f"--limit-mib {args.limit_mib} holds an n x n fp32 matrix ({n * n * 4 >> 20} MiB): nothing is proved")
    names = [] if args.methods == "none" else (args.methods.split(",") if args.methods else None)
    names = bench_scaling.pre_llm_methods() if names is None else names
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, n, 4, generator=gen)
    qk = torch.randn(1, n, 1, 4, generator=gen)
    calls = {
        "kernel cosine_argmax": lambda: reference.cosine_argmax(x, x),
        "kernel attention_received": lambda: reference.attention_received(qk, qk),
        "kernel nearest_distance": lambda: reference.nearest_distance(reference.normalize(x), 256),
    }
    for name in names:
        info = vtc.get_method(name)
        method = info.method_class(info.config_class(budget=args.budget))
        calls[name] = (lambda m, im: lambda: m.reduce(im))(method, bench_scaling.synthetic_image(method, n, args.dim))
    libc = ctypes.CDLL("libc.so.6")
    libc.mallopt(-3, 65536)  # M_MMAP_THRESHOLD: blocks of 64 KiB and more are mapped, and unmapped when freed
    libc.mallopt(-1, 65536)  # M_TRIM_THRESHOLD
    limit = _address_space() + args.limit_mib * 2**20
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    print(
        f"n = {n}: an n x n fp32 matrix is {n * n * 4 >> 20} MiB; allowed on top of the inputs: {args.limit_mib} MiB"
    )
    failed = []
    for name, call in calls.items():
        start = time.perf_counter()
        try:
            with torch.no_grad():
                call()
        except (RuntimeError, MemoryError) as err:
            failed.append(name)
            print(f"  {name}: OVER THE LIMIT ({str(err).splitlines()[0][:160]})", flush=True)
            continue
        libc.malloc_trim(0)
        print(f"  {name}: {time.perf_counter() - start:.2f} s", flush=True)
    print("every call stayed under the limit" if not failed else f"over the limit: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
