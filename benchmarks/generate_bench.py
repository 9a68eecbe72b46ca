"""``sagan export`` and ``sagan generate`` on this CPU, with G-EMA's forward pass and PNG encoding alone.

    python -m benchmarks.generate_bench                            # runs/default's checkpoint, tables into docs
    python -m benchmarks.generate_bench --checkpoint runs/smoke --num 2000 --no-ranks --no-doc

Needs a trained checkpoint (a run folder, checkpoints folder or step folder; runs/default by default),
so it is not part of ``python -m benchmarks``' "all". Nothing is written into the checkpoint's folder:
every output goes to a temporary folder. Four tables:

- **Parts**, in this process: G-EMA's ``G(z, y)`` at ``--batch`` (256) in float32 and in float64 (what
  ``sagan generate`` runs), ``torch.no_grad()``, median of alternating passes after a warm-up; the
  per-image noise draw of ``sagan generate`` (``Generation.noise``: a NumPy generator seeded by
  (seed, i)); the PNG encoding of one 32×32 image (``Encoding("png").encode``, the bytes written for
  PNG folders and into shards), on one thread.
- **export**: ``launch.export_command.export_generator`` per format in this process (G-EMA freshly
  copied, spectral norm folded, then one format written to a local folder), the first call and the
  median of the repeats after it; and one ``sagan export`` command (all three formats), its wall time
  from start to exit (Python start-up, imports, checkpoint load and model card included).
- **generate**: ``sagan generate --num-images N`` at its default batch size (256) and parts (1000),
  into a fresh local folder: one process (torch's default threads, ``OMP_NUM_THREADS`` as in this
  environment) and two ranks (``torchrun --standalone --nproc_per_node=2 --no-python sagan generate``,
  ``OMP_NUM_THREADS=1`` per rank). Reported: the command's wall time from start to exit (start-up and
  imports included) and images/s over it; the command's own time (its summary line: from after
  argument parsing to the end, so checkpoint load, generation, writes and the manifest) and images/s
  over it; the rate of its progress bar (rank 0's images over the bar's time: the generation alone);
  and the CPU time of every process of the command (ranks included) per image.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import resource
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks import machine, report, timing
from benchmarks.report import Result, Table

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
BAR = re.compile(r"(\d+)/(\d+) \[")  # tqdm's "n/total [elapsed<remaining, rate]"
SUMMARY_SECONDS = re.compile(r"^generated .* in ([\d.]+)s", re.MULTILINE)


@dataclasses.dataclass
class Options:
    checkpoint: str = "runs/default"  # relative to the repository root, or absolute, or s3://
    num: int = 0  # 0: 10,000, or 5,000 where the parts predict more than two minutes a row
    formats: tuple[str, ...] = ("png", "shards")
    ranks: bool = True  # also the two-rank torchrun rows
    batch: int = 256  # the forward pass timed in this process (generate's default batch size)
    repeats: int = 5
    export_repeats: int = 3


def fresh_copy(loaded) -> torch.nn.Module:
    """Another G-EMA like ``loaded``'s, built as ``load_generators`` builds it and given its state
    (``copy.deepcopy`` of a spectral-normed module breaks its parametrization)."""
    from models.layout import to_training_layout
    from models.sagan import build_models

    cfg = loaded.config
    G, _ = build_models(cfg.model, loaded.num_classes)
    to_training_layout(
        G, torch.device("cpu"), channels_last=cfg.trainer.channels_last and cfg.trainer.backend == "ddp"
    )
    G.load_state_dict(loaded.nets["ema"].state_dict())
    return G.eval()


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)  # every descendant waited for, ranks included
    return usage.ru_utime + usage.ru_stime


class _Pipe(threading.Thread):
    """Reads one of a command's pipes as it comes; for stderr, when each progress-bar state first appeared."""

    def __init__(self, stream) -> None:
        super().__init__(daemon=True)
        self.stream, self.chunks, self.seen = stream, [], {}  # seen: (n, total) -> perf_counter

    def run(self) -> None:
        pending = ""
        while chunk := os.read(self.stream.fileno(), 65536):
            now, text = time.perf_counter(), chunk.decode(errors="replace")
            self.chunks.append(text)
            *segments, pending = re.split(r"[\r\n]", pending + text)
            # tqdm ends a state with the next one's "\r": read the unterminated one too ("n/total [" is whole)
            for segment in [*segments, pending]:
                if match := BAR.search(segment):
                    self.seen.setdefault((int(match[1]), int(match[2])), now)

    @property
    def text(self) -> str:
        return "".join(self.chunks)


class CommandFailed(RuntimeError):
    pass


def run_command(command: list[str], env: dict[str, str] | None = None) -> dict[str, object]:
    """Wall and CPU seconds of one command, start to exit, its output, and its progress bar's time: from the
    bar's first state (0/N) to its last (N/N), as the lines came through the pipe (tqdm flushes each)."""
    print("$", shlex.join(command), flush=True)
    print(machine.uptime(), flush=True)
    cpu, started = children_cpu(), time.perf_counter()
    process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, err = _Pipe(process.stdout), _Pipe(process.stderr)
    out.start()
    err.start()
    returncode = process.wait(timeout=1800)
    wall, cpu = time.perf_counter() - started, children_cpu() - cpu
    out.join()
    err.join()
    if returncode:
        raise CommandFailed(f"{shlex.join(command)} failed ({returncode}):\n{err.text[-3000:]}")
    print(out.text.strip(), flush=True)
    ends = [(n, t) for (n, total), t in err.seen.items() if n == total and (0, total) in err.seen]
    bar = {"images": ends[-1][0], "seconds": ends[-1][1] - err.seen[(0, ends[-1][0])]} if ends else None
    return {
        "wall": wall,
        "cpu": cpu,
        "stdout": out.text,
        "stderr": err.text,
        "bar": bar,
        "uptime": machine.uptime(),
    }


# --------------------------------------------------------------------------------------------------
# The parts, in this process


def measure_parts(loaded, options: Options) -> dict[str, dict[str, float]]:
    from data_pipeline.encodings import Encoding
    from launch.generate_command import Generation

    G, G64 = loaded.nets["ema"], fresh_copy(loaded).double()
    g = torch.Generator().manual_seed(0)
    z = torch.randn(options.batch, G.z_dim, generator=g)
    y = torch.arange(options.batch) % G.num_classes
    z64 = z.double()

    def forward32() -> None:
        with torch.no_grad():
            G(z, y)

    def forward64() -> None:
        with torch.no_grad():
            G64(z64, y)

    samples = timing.alternate(
        {"float32": forward32, "float64": forward64}, warmup=1, repeats=options.repeats
    )
    parts = {
        f"G-EMA forward, {precision}, batch {options.batch}": {
            "images_per_second": options.batch / s.seconds,
            "ms_per_image": s.seconds / options.batch * 1e3,
            "cpu_ms_per_image": s.cpu_seconds / options.batch * 1e3,
        }
        for precision, s in samples.items()
    }

    with torch.no_grad():
        images = ((G64(z64, y).clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    from PIL import Image

    pil = [Image.fromarray(row) for row in images.permute(0, 2, 3, 1).numpy()]
    gen = Generation(
        checkpoint="", state_sha256="", step=0, generator="ema", num=10**6, classes=(0,), seed=0,
        part_size=1000, format="png", resolution=pil[0].width, z_dim=G.z_dim, num_classes=G.num_classes,
    )  # fmt: skip
    png = Encoding("png")

    def best(call, count: int) -> tuple[float, float]:
        """Wall and CPU seconds per item, the best of ``options.repeats`` rounds."""
        rounds = []
        for _ in range(options.repeats):
            wall, cpu = time.perf_counter(), time.process_time()
            call()
            rounds.append(((time.perf_counter() - wall) / count, (time.process_time() - cpu) / count))
        return min(rounds)

    count = 4 * len(pil)
    encode = best(lambda: [png.encode(pil[i % len(pil)]) for i in range(count)], count)
    noise = best(lambda: [gen.noise(i) for i in range(count)], count)
    sizes = [len(png.encode(image)) for image in pil]
    for name, (wall, cpu) in {
        f"PNG encoding ({pil[0].width}×{pil[0].height}, one thread)": encode,
        "noise draw (Generation.noise, one image)": noise,
    }.items():
        parts[name] = {
            "images_per_second": 1 / wall,
            "ms_per_image": wall * 1e3,
            "cpu_ms_per_image": cpu * 1e3,
        }
    parts["_png_bytes"] = {"mean": float(np.mean(sizes))}
    return parts


# --------------------------------------------------------------------------------------------------
# export


def measure_export(loaded, options: Options, tmp: Path) -> dict[str, object]:
    from launch.export_command import FILES, FORMATS, export_generator, generator_arguments

    model = generator_arguments(loaded.config.model, loaded.num_classes)
    calls: dict[str, list[float]] = {name: [] for name in FORMATS}
    sizes: dict[str, int] = {}
    for attempt in range(1 + options.export_repeats):
        for name in FORMATS:
            folder = tmp / f"export-{attempt}-{name}"
            folder.mkdir()
            G = fresh_copy(loaded)
            started = time.perf_counter()
            export_generator(G, model, folder, (name,))
            calls[name].append(time.perf_counter() - started)
            sizes[name] = sum((folder / f).stat().st_size for f in FILES[name])
    checkpoint, failure = options.checkpoint, None
    try:
        command = run_command(
            [str(BIN / "sagan"), "export", "--checkpoint", checkpoint, "--out", str(tmp / "export-cli")]
        )
    except CommandFailed as err:
        # Again from a copy of the step folder alone, outside its run folder (no eval/ beside it).
        failure = str(err).strip().splitlines()[-1]
        print(f"sagan export failed ({failure}): again from a copy of the step folder", flush=True)
        checkpoint = str(tmp / "copy" / "checkpoints" / Path(loaded.folder).name)
        shutil.copytree(loaded.folder, checkpoint)
        command = run_command(
            [str(BIN / "sagan"), "export", "--checkpoint", checkpoint, "--out", str(tmp / "export-cli-2")]
        )
    return {
        "calls": calls,  # seconds of each export_generator call (fold included), the first one cold
        "bytes": sizes,
        "cli": {**{k: command[k] for k in ("wall", "cpu", "stdout")}, "failure": failure},
    }


# --------------------------------------------------------------------------------------------------
# generate


def measure_generate(options: Options, fmt: str, ranks: int, num: int, out: Path) -> dict[str, object]:
    sagan = [
        str(BIN / "sagan"), "generate", "--checkpoint", options.checkpoint, "--num-images", str(num),
        "--out", str(out), "--format", fmt,
    ]  # fmt: skip
    env = dict(os.environ)
    if ranks > 1:
        command = [str(BIN / "torchrun"), "--standalone", f"--nproc_per_node={ranks}", "--no-python", *sagan]
        env["OMP_NUM_THREADS"] = "1"
    else:
        command = sagan
    done = run_command(command, env)
    own = SUMMARY_SECONDS.search(done["stdout"])
    images = sum(1 for _ in out.rglob("*.png")) if fmt == "png" else None
    return {
        "format": fmt,
        "ranks": ranks,
        "num": num,
        "command": shlex.join(command),
        "omp_num_threads": env.get("OMP_NUM_THREADS", "unset"),
        "wall": done["wall"],
        "cpu": done["cpu"],
        "own_seconds": float(own.group(1)) if own else None,
        "bar": done["bar"],  # rank 0's bar: its images and the seconds from its first state to its last
        "png_files": images,
        "summary": done["stdout"].strip(),
        "uptime_after": done["uptime"],
    }


def choose_num(parts: dict[str, dict[str, float]]) -> int:
    """10,000 images, or 5,000 where float64 forward + noise + PNG encoding predict over 2 minutes."""
    ms = sum(v["ms_per_image"] for k, v in parts.items() if "float32" not in k and not k.startswith("_"))
    return 10_000 if 10_000 * ms / 1e3 <= 120 else 5_000


# --------------------------------------------------------------------------------------------------


def run(options: Options, command: str = "python -m benchmarks.generate_bench") -> Result:
    from trainer.checkpoint.generator import load_generators

    info = machine.describe()
    result = Result("generate", command, machine.headline(info), machine.uptime())
    print(result.machine, f"\nuptime before: {result.uptime_before}", flush=True)
    started = time.perf_counter()
    local = "://" not in options.checkpoint and not Path(options.checkpoint).is_absolute()
    loaded = load_generators(str(ROOT / options.checkpoint) if local else options.checkpoint, ("ema",))
    load_seconds = time.perf_counter() - started
    res = loaded.config.model.resolution
    what = (
        f"G-EMA of step {loaded.step} of `{options.checkpoint}` ({res}×{res}, {loaded.num_classes} classes)"
    )
    print(f"{what}: loaded in {load_seconds:.2f} s", flush=True)
    with tempfile.TemporaryDirectory(prefix="generate-bench-") as scratch:
        tmp = Path(scratch)
        exported = measure_export(loaded, options, tmp)
        print(f"export: {exported['calls']}", flush=True)
        parts = measure_parts(loaded, options)
        print(f"parts: {parts}", flush=True)
        num = options.num or choose_num(parts)
        rows = []
        for ranks in (1, 2) if options.ranks else (1,):
            for fmt in options.formats:
                out = tmp / f"generate-{fmt}-{ranks}"
                row = measure_generate(options, fmt, ranks, num, out)
                subprocess.run(["rm", "-rf", str(out)], check=True)
                rows.append(row)
                print(
                    f"{fmt} {ranks} rank(s): {num / row['wall']:.1f} img/s over the command's wall",
                    flush=True,
                )
    result.uptime_after = machine.uptime()
    result.data = {
        "checkpoint": options.checkpoint,
        "what": what,
        "step": loaded.step,
        "resolution": res,
        "load_seconds": load_seconds,
        "batch": options.batch,
        "repeats": options.repeats,
        "export_repeats": options.export_repeats,
        "threads": torch.get_num_threads(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS", "unset"),
        "parts": parts,
        "export": exported,
        "generate": rows,
    }
    return render(result)


def render(result: Result) -> Result:
    """The tables and notes of ``result.data`` (a fresh run's, or generate.json's for ``--render``)."""
    d = result.data
    parts, exported, rows, threads = d["parts"], d["export"], d["generate"], d["threads"]
    part_rows = [
        [name, f"{v['images_per_second']:,.0f}", f"{v['ms_per_image']:.2f}", f"{v['cpu_ms_per_image']:.2f}"]
        for name, v in parts.items()
        if not name.startswith("_")
    ]
    calls = exported["calls"]
    export_rows = [
        [f"`{name}`", f"{seconds[0]:.2f} s", f"{statistics.median(seconds[1:]):.2f} s",
         f"{exported['bytes'][name] / 2**20:.2f} MiB"]
        for name, seconds in calls.items()
    ]  # fmt: skip
    cli = exported["cli"]
    copied = " (from a copy of the step folder, see below)" if cli.get("failure") else ""
    export_rows.append(
        [f"`sagan export`, all three: the command, start to exit{copied}", f"{cli['wall']:.2f} s", "", f"CPU {cli['cpu']:.2f} s"]
    )  # fmt: skip
    gen_rows = []
    for r in rows:
        how = "1 process" if r["ranks"] == 1 else f"{r['ranks']} ranks (torchrun, OMP_NUM_THREADS=1)"
        b = r["bar"]
        bar = f"{b['seconds']:.1f} s, {r['num'] / b['seconds']:,.1f}" if b else "n/a"
        own = f"{r['own_seconds']:.1f} s, {r['num'] / r['own_seconds']:,.1f}" if r["own_seconds"] else "n/a"
        gen_rows.append([
            f"`{r['format']}`", how, f"{r['num']:,}", f"{r['wall']:.1f} s, {r['num'] / r['wall']:,.1f}", own,
            bar, f"{r['cpu'] / r['num'] * 1e3:.2f}",
        ])  # fmt: skip
    result.tables = [
        Table(
            ["`sagan generate --format`", "how", "images", "command wall: time, img/s", "own time, img/s",
             "generation alone (rank 0's bar): time, img/s", "CPU ms per image (all processes)"],
            gen_rows,
            "`sagan generate --num-images N` (batch 256, 1000 images per part, float64) into a fresh local "
            "folder. Command wall: start to exit, Python start-up and imports included. Own time: the "
            "command's summary line (from after its argument parsing: checkpoint load, generation, writes, "
            "manifest). Generation alone: from rank 0's progress bar's first state (0/n) to its last (n/n), "
            "as they came through the pipe; all N images over that time (the ranks have equal shares)",
        ),
        Table(
            ["part", "images/s", "ms per image (wall)", "CPU ms per image"],
            part_rows,
            f"The parts of generating, in one process: {d['what']}, {threads} thread(s) for the forward passes "
            f"(median of {d['repeats']} alternating passes after a warm-up, `torch.no_grad()`); noise and "
            f"encoding the best of {d['repeats']} rounds of {4 * d['batch']} images (mean PNG "
            f"{parts['_png_bytes']['mean']:.0f} bytes)",
        ),
        Table(
            ["`sagan export --format`", "first call", f"median of the next {d['export_repeats']}", "files"],
            export_rows,
            "`launch.export_command.export_generator` of one format in this process (a copy of G-EMA, "
            "spectral norm folded, the files written to local disk), and one `sagan export` command; "
            f"loading the checkpoint (`load_generators`) took {d['load_seconds']:.2f} s here",
        ),
    ]  # fmt: skip
    result.notes = notes(result)
    return result


def _load(uptime: str) -> float:
    match = re.search(r"load average: ([\d.]+)", uptime)
    return float(match[1]) if match else float("nan")


def notes(result: Result) -> list[str]:
    """What the numbers say, from the numbers."""
    d = result.data
    parts, rows, threads = d["parts"], d["generate"], d["threads"]
    f32 = next(v for k, v in parts.items() if "float32" in k)
    f64 = next(v for k, v in parts.items() if "float64" in k)
    encode = next(v for k, v in parts.items() if k.startswith("PNG"))
    noise = next(v for k, v in parts.items() if k.startswith("noise"))
    text = (
        f"G-EMA's forward pass is the cost: in float64, which `sagan generate` runs so that any world size "
        f"writes the same bytes, {f64['ms_per_image']:.2f} ms per image at batch {d['batch']}, "
        f"{f64['ms_per_image'] / f32['ms_per_image']:.1f}× float32's {f32['ms_per_image']:.2f} ms, against "
        f"{encode['ms_per_image']:.2f} ms to encode a PNG and {noise['ms_per_image']:.3f} ms to draw the noise."
    )
    one = {r["format"]: r for r in rows if r["ranks"] == 1 and r["bar"]}
    two = {r["format"]: r for r in rows if r["ranks"] == 2 and r["bar"]}
    if "png" in one:
        r = one["png"]
        bar_ms = r["bar"]["seconds"] / r["num"] * 1e3
        text += (
            f" One process writing PNGs took {bar_ms:.2f} ms per image while generating, "
            f"{f64['ms_per_image'] / bar_ms:.0%} of it the float64 forward pass and "
            f"{encode['ms_per_image'] / bar_ms:.0%} the encoding, and its command's wall adds "
            f"{r['wall'] - r['bar']['seconds']:.1f} s of start-up, imports and checkpoint load to the "
            f"{r['bar']['seconds']:.1f} s of generating {r['num']:,} images."
        )
    loads = [
        _load(result.uptime_before),
        *(_load(r["uptime_after"]) for r in rows),
        _load(result.uptime_after),
    ]
    text += (
        f" The machine was shared (load average {min(loads):.1f} to {max(loads):.1f} on {os.cpu_count()} cores "
        f"during the run): the forward passes' CPU time about equals their wall time, so their {threads} "
        f"threads had about one core between them"
    )
    pairs = [(fmt, one[fmt], two[fmt]) for fmt in one if fmt in two]
    if pairs:
        fmt, a, b = pairs[0]
        text += (
            f", and one `sagan generate` process used {a['cpu'] / a['wall']:.2f} cores on average while two "
            f"ranks of one thread each used {b['cpu'] / b['wall']:.2f} and generated "
            + " and ".join(f"{x['bar']['seconds'] / y['bar']['seconds']:.2f}× (`{f}`)" for f, x, y in pairs)
            + f" as fast, with {1 - (b['cpu'] / b['num']) / (a['cpu'] / a['num']):.0%} less CPU per image "
            f"(`{fmt}`)."
        )
    else:
        text += "."
    calls = d["export"]["calls"]
    slowest = max(calls, key=lambda name: statistics.median(calls[name][1:]))
    formats = sum(statistics.median(seconds[1:]) for seconds in calls.values())
    text += (
        (
            f" Of `sagan export`, TorchScript tracing is the slow format ({statistics.median(calls[slowest][1:]):.2f} s "
            f"of `{slowest}`); all three formats take {formats:.1f} s in-process, and the rest of the command's "
            f"{d['export']['cli']['wall']:.1f} s is start-up, imports, the checkpoint load and the model card."
        )
        if slowest == "torchscript"
        else (
            f" Of `sagan export`, `{slowest}` is the slow format ({statistics.median(calls[slowest][1:]):.2f} s); "
            f"all three take {formats:.1f} s in-process, and the rest of the command's "
            f"{d['export']['cli']['wall']:.1f} s is start-up, imports, the checkpoint load and the model card."
        )
    )
    failure = d["export"]["cli"].get("failure")
    out = [text]
    if failure:
        out.append(
            f"`sagan export --checkpoint {d['checkpoint']}` itself failed while writing the model card "
            f"(`{failure}`), so the command row exported a copy of the checkpoint's step folder, outside the "
            "run folder, whose model card then lists no evaluation."
        )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default=Options.checkpoint, help="a run, checkpoints or step folder")
    parser.add_argument(
        "--num", type=int, default=0, help="images per generate row (default: 10,000 or 5,000)"
    )
    parser.add_argument("--formats", default="png,shards")
    parser.add_argument("--no-ranks", action="store_true", help="skip the two-rank torchrun rows")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--no-doc", action="store_true", help="do not write docs/performance.md")
    parser.add_argument("--results", type=Path, default=report.RESULTS, help="folder for generate.json")
    parser.add_argument(
        "--render", action="store_true", help="no measuring: the tables again from the results' generate.json"
    )
    args = parser.parse_args()
    options = Options(
        checkpoint=args.checkpoint, num=args.num, formats=tuple(args.formats.split(",")),
        ranks=not args.no_ranks, repeats=args.repeats,
    )  # fmt: skip
    if args.render:
        saved = json.loads((args.results / "generate.json").read_text())
        result = render(Result(**{**saved, "tables": []}))
    else:
        result = run(options, shlex.join(["python", "-m", "benchmarks.generate_bench", *sys.argv[1:]]))
    print(result.text(), flush=True)
    path = report.save(result, results=args.results, doc=None if args.no_doc else report.DOC)
    print(f"saved {path}" + ("" if args.no_doc else f" and the tables in {report.DOC}"), flush=True)


if __name__ == "__main__":
    main()
