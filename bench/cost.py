"""Cost per variant: multiply-adds per token (pipeline/coders/cost.py) beside measured seconds.

For each width (1,024 and 4,096 latents) at the cpu-large shape (10 layers x 576, batch 512,
L0 32): the per-layer SAEs, the crosscoder, the default fmxcoder (per_latent R2 + masking +
collapse penalty), its two halves (factorised only, masked only), the cp reading, and the
crosscoders matched to the fmxcoder in parameters and in training-step MACs (resolved by
``pipeline.coders.cost.matching_latents``, as a manifest's ``match`` is). Each is trained
on random batches (Adam, as the trainer steps it) for ``--warmup`` untimed and ``--steps``
timed steps, in ``--rounds`` passes over the variants, so that a change in the machine's
load falls on all of them. Recorded: the median wall seconds and the median process CPU
seconds (all threads) per step, and the CPU seconds' ratio to the crosscoder's of the same
width; on a shared machine wall time moves with the others' load, CPU time much less (the
load average is recorded).

    nice python bench/cost.py --threads 2   # writes bench/results/cost-cpu.json
    python bench/cost.py --table            # that file as the README's markdown table
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from common import cpu_model, load_average

from pipeline.coders import build_coder, coder_config_from_dict
from pipeline.coders.cost import macs_per_token, matching_latents, measure_fn, parameter_count

FMX = {
    "kind": "fmxcoder",
    "encoder_factorization": "per_latent",
    "decoder_factorization": "per_latent",
    "rank": 2,
    "masking_probability": 0.25,
    "collapse_coefficient": 0.1,
}
VARIANTS = {
    "per-layer-sae": {"kind": "per_layer_sae", "k": 3},
    "crosscoder": {"kind": "crosscoder"},
    "fmxcoder": FMX,
    "fmx-factorised-only": {**FMX, "masking_probability": 0.0, "collapse_coefficient": 0.0},
    "fmx-masked-only": {
        **FMX,
        "encoder_factorization": "dense",
        "rank": None,
        "decoder_factorization": "dense",
    },
    "fmx-cp": {**FMX, "encoder_factorization": "cp", "decoder_factorization": "cp", "rank": 1024},
}


def config(name: str, fields: dict, width: int, n_layers: int, d_model: int):
    base = {"n_layers": n_layers, "d_model": d_model, "activation": "topk", "k": 32}
    if fields["kind"] == "per_layer_sae":
        base["latents_per_layer"] = width // n_layers
    else:
        base["n_latents"] = width
    return coder_config_from_dict(base | fields)


def matched(target, measure: str, batch: int):
    """The smallest crosscoder reaching ``target``'s parameters or step MACs."""
    template = coder_config_from_dict(
        {
            "kind": "crosscoder",
            "n_layers": target.n_layers,
            "d_model": target.d_model,
            "n_latents": 32,
            "activation": "topk",
            "k": 32,
        }
    )
    goal = measure_fn(measure, batch)(target)
    return template.model_copy(
        update={"n_latents": matching_latents(template, measure, goal, batch)}
    )


def step_seconds(cfg, batch: int, warmup: int, steps: int) -> list[tuple[float, float]]:
    """(wall, process CPU) seconds of each timed training step: loss, backward and an Adam
    step. CPU seconds sum the threads and hardly move with other processes' load."""
    coder = build_coder(cfg).train()
    optimizer = torch.optim.Adam(coder.parameters(), lr=1e-3)
    x = torch.randn(batch, cfg.n_layers, cfg.d_model, generator=torch.Generator().manual_seed(0))
    times = []
    for step in range(warmup + steps):
        started, cpu = time.perf_counter(), time.process_time()
        loss = coder.training_loss(x, step, warmup + steps).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        times.append((time.perf_counter() - started, time.process_time() - cpu))
    return times[warmup:]


def markdown(result: dict) -> str:
    """The README's table: one row per width and variant."""
    lines = [
        "| latents | variant | n_latents | parameters | MACs/token enc / dec (sparse) / step "
        "| step s (median) | CPU s (median) | CPU vs crosscoder |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        sparse = f" ({r['decode_sparse'] / 1e6:.2f}M)" if r["decode_sparse"] is not None else ""
        macs = (
            f"{r['encode'] / 1e6:.2f}M / {r['decode'] / 1e6:.2f}M{sparse} / {r['step'] / 1e6:.1f}M"
        )
        lines.append(
            f"| {r['width']:,} | {r['variant']} | {r['latents']:,} | {r['parameters'] / 1e6:.2f}M "
            f"| {macs} | {r['step_s_median']:.2f} | {r['step_cpu_s_median']:.2f} "
            f"| {r['cpu_vs_crosscoder']:.2f}x |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--widths", type=int, nargs="+", default=[1024, 4096])
    parser.add_argument("--layers", type=int, default=10)
    parser.add_argument("--d-model", type=int, default=576)
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("bench/results/cost-cpu.json"))
    parser.add_argument(
        "--table", action="store_true", help="Print --out as markdown; run nothing."
    )
    args = parser.parse_args()
    if args.table:
        print(markdown(json.loads(args.out.read_text())))
        return
    torch.set_num_threads(args.threads)
    rows = []
    for width in args.widths:
        configs = {
            name: config(name, fields, width, args.layers, args.d_model)
            for name, fields in VARIANTS.items()
        }
        for measure, label in (("params", "params"), ("step_macs", "compute")):
            configs[f"crosscoder-matched-{label}"] = matched(
                configs["fmxcoder"], measure, args.batch
            )
        times: dict[str, list[tuple[float, float]]] = {name: [] for name in configs}
        for _ in range(args.rounds):
            for name, cfg in configs.items():
                times[name] += step_seconds(cfg, args.batch, args.warmup, args.steps)
        wall = {name: statistics.median(t[0] for t in ts) for name, ts in times.items()}
        cpu = {name: statistics.median(t[1] for t in ts) for name, ts in times.items()}
        for name, cfg in configs.items():
            macs = macs_per_token(cfg, args.batch).as_dict()
            row = {"width": width, "variant": name, "latents": cfg.total_latents}
            row |= {"parameters": parameter_count(cfg), **macs, "step_s_median": wall[name]}
            row |= {
                "step_cpu_s_median": cpu[name],
                "step_vs_crosscoder": wall[name] / wall["crosscoder"],
            }
            row |= {"cpu_vs_crosscoder": cpu[name] / cpu["crosscoder"], "step_s": times[name]}
            rows.append(row)
            print(
                f"{width:>5} {name:<28} {macs['step'] / 1e6:8.2f}M MACs/token/step "
                f"{wall[name]:.3f} s/step, {cpu[name]:.3f} CPU s/step "
                f"({row['cpu_vs_crosscoder']:.2f}x the crosscoder's CPU)",
                flush=True,
            )
    result = {
        "shape": {"n_layers": args.layers, "d_model": args.d_model, "batch": args.batch, "k": 32},
        "threads": args.threads,
        "warmup_steps": args.warmup,
        "timed_steps": args.steps,
        "rounds": args.rounds,
        "cpu": cpu_model(),
        "torch": torch.__version__,
        "load_average": load_average(),
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
