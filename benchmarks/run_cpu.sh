#!/usr/bin/env bash
# The CPU benchmark set quoted in the README's Performance section. Run from the repository root on
# an otherwise idle machine (about 40 minutes on 2 cores); results are appended to
# benchmarks/results/*_cpu.jsonl. Every case of round_throughput runs in its own process, so that
# its peak_rss_mb is that case's peak memory.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
rt() { "$PY" -m benchmarks.round_throughput "$@"; }

# SimpleNet (paper's MNIST shape, BN), 600 samples per client, batch 64, 2 local epochs:
# marsjax's round vs the PyTorch per-client loop vs a JAX per-client jit loop, same process.
for n in 20 100; do
  rt --cases "simplenet:$n" --torch "simplenet:$n" --jax-loop "simplenet:$n" --peak --repeats 3
done
# 500 clients per round: memory and throughput of marsjax alone.
rt --cases simplenet:500 --peak --repeats 2
# ResNet-18 (CIFAR stem, 32x32x3), 64 samples per client.
rt --cases resnet18:10:64 --torch resnet18:10:64 --jax-loop resnet18:10:64 --repeats 2
# The same round on 1, 2, 4, 8 (fake) devices.
"$PY" -m benchmarks.device_scaling --devices 1,2,4,8 --case simplenet:40:300
# Federations of 1,000,000 registered clients, rounds of up to 10,000 clients, MARS's selection at
# 10,000 uploads (about 12 minutes; every case in its own process).
"$PY" -m benchmarks.scale_clients --out benchmarks/results/scale_clients_cpu.jsonl
# FedAvg's mean of 100 ResNet-18 updates vs numpy's (about 2 minutes).
"$PY" -m benchmarks.bench_mars --clients 100 --only-fedavg --reps 5 --out benchmarks/results/mars_cost_cpu.jsonl
