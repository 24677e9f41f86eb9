"""Where a BERT-base encoder forward spends its GPU time, dense vs sparsified (80% of 32x32 tiles).

    python bench/profile_encoder.py [--batch 64] [--seq 128]

Prints the top kernels of each form by CUDA time (torch.profiler), so a sparse slowdown can be
pinned on a kernel rather than guessed.
"""

import argparse

import torch
from _common import pruned_bert
from torch.profiler import ProfilerActivity, profile

import rpp_triton as rpp


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--sparsity", type=float, default=0.8)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("profile_encoder: needs a CUDA device; skipped")
        return
    torch.manual_seed(0)
    model = pruned_bert(args.sparsity, 32, torch.bfloat16, "cuda")
    ids = torch.randint(0, 30522, (args.batch, args.seq), device="cuda")
    for form in ("dense", "sparse"):
        if form == "sparse":
            rpp.sparsify(model, block_size=32, min_sparsity=0.5)
        with torch.no_grad():
            for _ in range(3):
                model(input_ids=ids)
            torch.cuda.synchronize()
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                for _ in range(3):
                    model(input_ids=ids)
                torch.cuda.synchronize()
        print(f"== {form} (3 forwards, batch {args.batch}, seq {args.seq})")
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=8, max_name_column_width=60))


if __name__ == "__main__":
    main()
