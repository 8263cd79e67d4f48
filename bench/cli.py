"""How fast the CLI answers: ``pipeline --help``, ``--version``, every command's ``--help``,
and the read-only commands ``ls``, ``runs`` and ``show`` on a tiny store and run (harvested
and trained once into a temporary data directory, untimed).

Each is run ``--repeats`` times as a fresh process (``python -m pipeline.cli ...``, so the
interpreter start-up counts, as it does for a user); the median wall time must stay under
0.5 s. The CPU time each used is recorded too: on a loaded machine the wall time also
measures the wait for a core, the CPU time only the command's own work. Also records which
heavy modules (torch, transformer_lens, dask, zarr, ...) each imported: none should be.

    python bench/cli.py              # writes bench/results/cli-cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import cpu_model, load_average

REPO = Path(__file__).resolve().parents[1]
LIMIT_S = 0.5
HEAVY = ("torch", "transformer_lens", "dask", "zarr", "transformers", "pyarrow", "numpy")
PROBE = (
    "import sys; from pipeline.cli import main\n"
    "try:\n    main(sys.argv[1:], standalone_mode=False)\nexcept SystemExit:\n    pass\n"
    f"print('HEAVY', [m for m in {HEAVY!r} if m in sys.modules], file=sys.stderr)"
)


def commands() -> list[str]:
    sys.path.insert(0, str(REPO))
    from pipeline.cli import main

    return sorted(main.commands)


def timed(args: list[str], env: dict[str, str], module: bool = True) -> tuple[float, float]:
    """Wall seconds of one fresh process, and the CPU seconds (user + system) it used: on a
    shared, loaded machine the wall time waits for the CPU, the CPU time is the work."""
    cmd = [sys.executable, "-m", "pipeline.cli", *args] if module else [sys.executable, *args]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    subprocess.run(cmd, env=env, capture_output=True, check=True)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu


def heavy_imports(args: list[str], env: dict[str, str]) -> list[str]:
    done = subprocess.run(
        [sys.executable, "-c", PROBE, *args], env=env, capture_output=True, text=True, check=True
    )
    line = next(ln for ln in done.stderr.splitlines() if ln.startswith("HEAVY"))
    return json.loads(line.removeprefix("HEAVY ").replace("'", '"'))


def read_only_cases(data: Path, env: dict[str, str]) -> list[list[str]]:
    """Build a tiny store and one tiny run under ``data`` (untimed); the commands to time."""
    tiny = REPO / "manifests"
    for args in (["harvest", str(tiny / "harvest/tiny-random.yaml")],
                 ["train", str(tiny / "coders/tiny-crosscoder.yaml")]):  # fmt: skip
        subprocess.run([sys.executable, "-m", "pipeline.cli", "-q", *args], env=env, check=True)
    (key,) = [p.name for p in (data / "cache").iterdir() if p.is_dir()]
    return [["ls"], ["runs"], ["show", key[:8]]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=REPO / "bench/results/cli-cpu.json")
    args = parser.parse_args()
    data = Path(tempfile.mkdtemp(prefix="fmx-bench-cli-"))
    env = {**os.environ, "PYTHONPATH": str(REPO), "FMX_CACHE_DIR": str(data / "cache"),
           "FMX_RUNS_DIR": str(data / "runs")}  # fmt: skip
    cases = [["--help"], ["--version"]] + [[name, "--help"] for name in commands()]
    cases += read_only_cases(data, env)
    rows = []
    for case in cases:
        walls, cpus = zip(*(timed(case, env) for _ in range(args.repeats)), strict=True)
        rows.append(
            {
                "command": "pipeline " + " ".join(case),
                "median_s": round(statistics.median(walls), 4),
                "max_s": round(max(walls), 4),
                "median_cpu_s": round(statistics.median(cpus), 4),
                "heavy_modules_imported": heavy_imports(case, env),
            }
        )
        row = rows[-1]
        print(
            f"{row['command']:<28} median {row['median_s']:.3f} s "
            f"(cpu {row['median_cpu_s']:.3f} s)",
            flush=True,
        )
    baseline = [
        timed(["-c", "pass"], env, module=False)[0] for _ in range(args.repeats)
    ]  # bare interpreter
    result = {
        "benchmark": "cli",
        "command": " ".join(["python", *sys.argv]),
        "cpu": cpu_model(),
        "load_average": load_average(),
        "python": sys.version.split()[0],
        "repeats": args.repeats,
        "limit_s": LIMIT_S,
        "python_startup_median_s": round(statistics.median(baseline), 4),
        "cases": rows,
        "slowest_median_s": max(r["median_s"] for r in rows),
        "slowest_median_cpu_s": max(r["median_cpu_s"] for r in rows),
        "all_under_limit": all(r["median_s"] < LIMIT_S for r in rows),
        "all_cpu_under_limit": all(r["median_cpu_s"] < LIMIT_S for r in rows),
        "no_heavy_imports": not any(r["heavy_modules_imported"] for r in rows),
    }
    shutil.rmtree(data)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    under, light = result["all_under_limit"], result["no_heavy_imports"]
    print(f"slowest {result['slowest_median_s']:.3f} s; under {LIMIT_S} s: {under}; light: {light}")


if __name__ == "__main__":
    main()
