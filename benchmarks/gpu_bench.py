"""GPU benchmark for benchmarks/gpu_check.sh: the AlexNet-shaped head (FC2 4096x4096 -> ReLU ->
FC3 4096x1000) on N = 50,000 samples of sparse ReLU inputs. Times the CUDA kernels on 4096 random
weights and on the whole layer (16.7M weights by the fused kernel, all 50,000 samples in one call;
extrapolated from 256 full rows so the check fits in 5 minutes; the two-stage ops on 16 rows beside it), the PyTorch reference on the same GPU, and the naive loop on a
few weights; prints weights/s and ratios, and the floor of the whole-layer sweep (moment GEMMs +
the per-pair memory traffic)."""
import time

import torch
from torch import nn

import weightablate as wa


def sync_time(fn):
    torch.cuda.synchronize()
    t = time.perf_counter()
    out = fn()
    torch.cuda.synchronize()
    return time.perf_counter() - t, out


def main():
    dev = torch.device("cuda")
    g = torch.Generator(device=dev).manual_seed(0)
    N, I, C = 50_000, 4096, 1000
    model = nn.Sequential(nn.Linear(I, I), nn.ReLU(), nn.Linear(I, C)).to(dev).eval()
    X = torch.relu(torch.randn(N, I, device=dev, generator=g) - 0.3) * 2.0
    y = torch.randint(0, C, (N,), device=dev, generator=g)
    data = (X, y)
    rows = []

    # large batches and chunks: a chunk of ~5,400 weights x 25,000 samples (16 GiB / 4 / 32 B per
    # pair) keeps the GPU busy between two Python round trips (the 1 GiB default suits a CPU's cache)
    def run(label, weights, backend, batch=N // 2):
        t, r = sync_time(lambda: wa.ablate(model, "0", data, weights=weights, backend=backend, batch_size=batch,
                                           max_memory="16GiB", progress=False))
        rows.append((label, len(r), t, len(r) / t))
        return r

    run("warm-up", 64, "cuda")
    r_cuda = run("cuda, 4096 random weights", 4096, "cuda")
    r_torch = run("torch reference, 4096 random weights", 4096, "torch")
    rel = ((r_cuda.delta_loss - r_torch.delta_loss).abs() / r_torch.delta_loss.abs().clamp_min(1e-300)).max()
    print(f"cuda vs torch reference, max relative difference: {rel:.2e}")
    naive_idx = r_cuda.indices[:2]
    run("naive, 2 weights", naive_idx, "naive")
    # whole layer: a slice of full rows (all 4096 weights of 256 units share their moments) -> extrapolate
    slice_rows = 256
    flat = torch.arange(slice_rows * I)
    run(f"cuda, {slice_rows} full rows (fused kernel)", flat, "cuda")
    full_s = rows[-1][2] * I / slice_rows
    # the two-stage ops on fewer rows, for the fused kernel's speed-up on the same device
    from weightablate import closed_form

    old, closed_form.FUSED_MIN_RUN = closed_form.FUSED_MIN_RUN, 1 << 62
    try:
        two_rows = 16
        run(f"cuda, {two_rows} full rows (two-stage ops)", torch.arange(two_rows * I), "cuda")
    finally:
        closed_form.FUSED_MIN_RUN = old
    two_stage_full = rows[-1][2] * I / two_rows
    # floor = the D = 6 float64 moment GEMMs over all units at the measured float64 matmul rate
    # + the per-pair traffic of the two-stage design (d written once and read once in float64,
    # 16 bytes per weight and sample) at the measured device-to-device copy rate
    a = torch.randn(4096, 4096, device=dev, dtype=torch.float64)
    t = min(sync_time(lambda: a @ a)[0] for _ in range(3))
    rate = 2 * 4096**3 / t
    buf = torch.empty(1 << 30, dtype=torch.uint8, device=dev)
    t = min(sync_time(lambda: buf.clone())[0] for _ in range(3))
    bandwidth = 2 * buf.numel() / t
    gemm_floor = 6 * 2 * N * C * I / rate
    pair_floor = 16 * N * I * I / bandwidth
    floor = gemm_floor + pair_floor
    print(f"\n{'workload':42s} {'weights':>10s} {'seconds':>9s} {'weights/s':>12s}")
    for label, k, t, wps in rows:
        print(f"{label:42s} {k:10d} {t:9.3f} {wps:12.4g}")
    cuda_wps = rows[1][3]
    print(f"\ncuda / torch reference: {cuda_wps / rows[2][3]:.1f}x; cuda / naive: {cuda_wps / rows[3][3]:.0f}x")
    print(f"whole layer (16.7M weights, N={N}): {full_s:.1f} s extrapolated from {slice_rows} rows by the fused "
          f"kernel (target < 10 s, stretch 2 s); the two-stage ops: {two_stage_full:.1f} s from 16 rows "
          f"({two_stage_full / full_s:.1f}x)")
    print(f"two-stage floor {floor:.2f} s = moment GEMMs {gemm_floor:.2f} s (float64 matmul {rate / 1e12:.1f} "
          f"TFLOP/s) + d traffic {pair_floor:.2f} s ({bandwidth / 1e12:.2f} TB/s); the fused kernel has no d "
          f"traffic: its floor is the GEMMs, {gemm_floor:.2f} s; fused measured / two-stage floor {full_s / floor:.1f}x")


if __name__ == "__main__":
    main()
