"""Performance benchmark: ``python -m msa.bench`` (``--help`` explains every option).

The command line of ``msa.bench``: ``build_parser`` (every flag), ``main`` (resolves the run, measures
the matmul peak, runs the chosen sections in order, prints their tables and the GPU targets, writes
the JSON report). What each section measures is in the package docstring and in its own module.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from msa.bench.common import GIB, REFERENCE, RSICD_TEST_CAPTIONS, RSICD_TEST_IMAGES, SECTIONS, TARGETS, TINY, fmt, log
from msa.bench.context import Bench
from msa.bench.evaluate import section_eval
from msa.bench.loader import section_loader
from msa.bench.mscmat import section_mscmat
from msa.bench.timing import device_name, maxrss_gib, measure_matmul_tflops
from msa.bench.train import section_train

RUNNERS = {"train": section_train, "mscmat": section_mscmat, "eval": section_eval, "loader": section_loader}


def _int_list(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 0:
        raise argparse.ArgumentTypeError(f"expected non-negative integers, got {text!r}")
    return values


def _sections(text: str) -> tuple[str, ...]:
    names = tuple(s.strip() for s in text.split(",") if s.strip())
    bad = [s for s in names if s not in SECTIONS]
    if bad or not names:
        raise argparse.ArgumentTypeError(f"unknown sections {bad}; choose from {','.join(SECTIONS)}")
    return tuple(dict.fromkeys(names))


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Appends "(default: X)" unless the help text already states its default or there is none to show."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" in text.lower() or action.default in (None, False, argparse.SUPPRESS, []):
            return text
        default = ",".join(map(str, action.default)) if isinstance(action.default, tuple) else action.default
        return f"{text} (default: {default})"


def build_parser() -> argparse.ArgumentParser:
    from msa.config import PRESETS

    p = argparse.ArgumentParser(
        prog="python -m msa.bench",
        description=__doc__.split("\n\n")[0] + " Training step, MSCMAT, evaluation and loader timings; "
        "see the module docstring for what each section measures.",
        formatter_class=_HelpFormatter,
        epilog="Examples: GPU, paper preset: python -m msa.bench.  CPU smoke test: python -m msa.bench --tiny "
        "--device cpu --json out.json.  Small CPU run: python -m msa.bench --device cpu --preset small "
        "--batch-sizes 8,32 --steps 3.",
    )
    p.add_argument("--preset", choices=sorted(PRESETS), default=None,
                   help="model preset; towers are always randomly initialised (compute only). "
                   "Default: paper on a GPU, small on the CPU or with --tiny")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="config override on top of the preset, repeatable (e.g. image.size=128)")
    p.add_argument("--device", default="auto", help="cuda, cuda:N, cpu, or auto (cuda when available)")
    p.add_argument("--batch-sizes", type=_int_list, default=None,
                   help="comma-separated batch sizes for train and mscmat. Default 32,128,256,512 (--tiny: 4,8)")
    p.add_argument("--steps", type=int, default=None, help="timed calls per measurement, median reported "
                   "(default 10; --tiny: 2); eval repeats min(steps, 3) times")
    p.add_argument("--warmup", type=int, default=None, help="untimed calls before timing (default 3; --tiny: 1)")
    p.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None,
                   help="bf16 autocast for train, mscmat and eval; GPU only, as in training "
                   "(default: the preset's train.bf16 on a GPU, off on the CPU)")
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None,
                   help="channels_last memory format for the model and its input: sets train.channels_last "
                   "(default: the preset's, off in every preset); the mscmat and eval sections use it too")
    p.add_argument("--sections", type=_sections, default=SECTIONS,
                   help=f"comma-separated subset of {','.join(SECTIONS)}, run in that order")
    p.add_argument("--tiny", action="store_true",
                   help="CPU smoke sizes: small preset at 32px, B=4,8, 2 steps, a scaled-down eval split and "
                   "corpus; numbers are for checking the benchmark runs, not for performance")
    p.add_argument("--matmul-tflops", type=float, default=None,
                   help="peak matrix rate for MFU in TFLOP/s instead of measuring it (measured: a large "
                   "bf16 matmul on a GPU, fp32 on the CPU)")
    p.add_argument("--json", type=Path, default=None, metavar="OUT", help="also write every number to this JSON file")
    p.add_argument("--threads", type=int, default=None,
                   help="torch intra-op CPU threads (default: torch's choice; --tiny: 1). On a loaded machine "
                   "use 1: with more threads than free cores every op waits on descheduled threads")
    g = p.add_argument_group("train options")
    g.add_argument("--compile", action="store_true", help="sets train.compile: torch.compile of the model, as "
                   "msa.engine.prepare_training does in training (compilation happens in the warm-up; FLOPs are "
                   "counted on the eager model)")
    g.add_argument("--fused-adamw", action="store_true",
                   help="sets train.fused_adamw: AdamW(fused=True), as msa.engine.prepare_training builds it")
    g.add_argument("--cudnn-benchmark", action="store_true", help="set torch.backends.cudnn.benchmark=True")
    g.add_argument("--no-encoders-row", action="store_true", help="skip the encoders-only fwd+bwd timing")
    g.add_argument("--profile", action="store_true",
                   help="after timing each batch size, profile 3 more steps with torch.profiler: on a GPU the "
                   "device's busy time and kernel launches per step (busy well under the step's time: "
                   "launch-bound), and the operators with the most self time")
    g = p.add_argument_group("mscmat options")
    g.add_argument("--no-naive", action="store_true", help="skip the naive pair-by-pair baseline timings "
                   "(the agreement check still runs)")
    g.add_argument("--naive-budget-s", type=float, default=60.0,
                   help="skip the naive baseline at a batch size whose projected time (warm-up + steps, "
                   "extrapolated as B^2 from the previous size) exceeds this")
    g.add_argument("--naive-max-gib", type=float, default=None,
                   help="skip the naive baseline when its projected memory exceeds this (default: 90%% of "
                   "free GPU memory; 4 GiB on the CPU)")
    g = p.add_argument_group("eval options")
    g.add_argument("--eval-images", type=int, default=None,
                   help=f"images in the eval split (default RSICD test size {RSICD_TEST_IMAGES}; --tiny: 32)")
    g.add_argument("--eval-captions", type=int, default=None,
                   help=f"captions in the eval split (default {RSICD_TEST_CAPTIONS}; --tiny: 160)")
    g.add_argument("--eval-batch-size", type=int, default=None,
                   help="embedding batch size (default: 512 on a GPU, the preset's train.eval_batch_size on "
                   "the CPU; --tiny: 32)")
    g.add_argument("--e2e-images", type=int, default=None,
                   help="synthetic test images for the end-to-end embed_split timing (default 64; --tiny: 8)")
    g = p.add_argument_group("loader options")
    g.add_argument("--loader-workers", type=_int_list, default=(0, 1), help="DataLoader worker counts to measure")
    g.add_argument("--loader-images", type=int, default=None,
                   help="synthetic train images in the loader's shard set (default 64; --tiny: 12)")
    g.add_argument("--loader-batches", type=int, default=None, help="batches read per measurement "
                   "(default 200, about an epoch of a small corpus: the worker start is paid once; --tiny: 6)")
    g.add_argument("--loader-batch-size", type=int, default=None,
                   help="loader batch size (default: the preset's train.batch_size; --tiny: 8)")
    g.add_argument("--loader-image-px", type=int, default=None,
                   help="stored image size of the synthetic corpus (default: the model's input size)")
    return p


def _resolve(args: argparse.Namespace) -> tuple[argparse.Namespace, torch.device, Any]:
    from msa.config import resolve_config

    if args.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("msa.bench: --device cuda but CUDA is not available")
    tiny = args.tiny
    preset = args.preset or ("paper" if device.type == "cuda" and not tiny else "small")
    overrides = (list(TINY["overrides"]) if tiny else []) + ["image.weights=null", "text.weights=null"] + args.set
    # The train options are config fields: the engine applies them exactly as it does in training.
    overrides += [f"train.{key}=true" for key, on in (("compile", args.compile), ("fused_adamw", args.fused_adamw),
                                                      ("channels_last", args.channels_last)) if on]
    if args.channels_last is False:
        overrides.append("train.channels_last=false")
    cfg = resolve_config(preset, overrides)
    if cfg.clip.enabled:  # random CLIP towers too: they are asked for explicitly (a checkpoint is never read)
        cfg = resolve_config(preset, ["clip.checkpoint=null", "clip.random_init=true", *overrides])
    args.compile, args.fused_adamw = cfg.train.compile, cfg.train.fused_adamw

    def pick(name, default, tiny_value=None):
        if getattr(args, name) is None:
            setattr(args, name, tiny_value if tiny and tiny_value is not None else default)

    pick("batch_sizes", (32, 128, 256, 512), TINY["batch_sizes"])
    pick("steps", 10, TINY["steps"])
    pick("warmup", 3, TINY["warmup"])
    pick("eval_images", RSICD_TEST_IMAGES, TINY["eval_images"])
    pick("eval_captions", RSICD_TEST_CAPTIONS, TINY["eval_captions"])
    pick("eval_batch_size", 512 if device.type == "cuda" else cfg.train.eval_batch_size, TINY["eval_batch_size"])
    pick("e2e_images", 64, TINY["e2e_images"])
    pick("loader_images", 64, TINY["loader_images"])
    pick("loader_batches", 200, TINY["loader_batches"])
    pick("loader_batch_size", cfg.train.batch_size, TINY["loader_batch_size"])
    if min(args.batch_sizes) < 1 or args.steps < 1 or args.warmup < 0:
        raise SystemExit("msa.bench: batch sizes and --steps must be >= 1, --warmup >= 0")
    if args.bf16 is None:
        args.bf16 = cfg.train.bf16 and device.type == "cuda"
    if args.bf16 and device.type != "cuda":
        log("--bf16 applies on a GPU only (as in training): running fp32 on the CPU")
        args.bf16 = False
    if args.threads is None and tiny:
        args.threads = 1
    if args.threads is not None:
        if args.threads < 1:
            raise SystemExit("msa.bench: --threads must be >= 1")
        torch.set_num_threads(args.threads)
    args.channels_last = cfg.train.channels_last
    return args, device, cfg


def main(argv: list[str] | None = None) -> int:
    for key, value in (("HF_HUB_OFFLINE", "1"), ("TRANSFORMERS_OFFLINE", "1"), ("TOKENIZERS_PARALLELISM", "false")):
        os.environ.setdefault(key, value)
    args, device, cfg = _resolve(build_parser().parse_args(argv))
    if args.cudnn_benchmark:
        torch.backends.cudnn.benchmark = True
    meta: dict[str, Any] = {
        "device": device_name(device),
        "device_type": device.type,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "preset": cfg.preset,
        "tiny": args.tiny,
        "bf16": args.bf16,
        "channels_last": args.channels_last,
        "batch_sizes": list(args.batch_sizes),
        "steps": args.steps,
        "warmup": args.warmup,
        "config": cfg.to_dict(),
    }
    load, cores = os.getloadavg()[0], os.cpu_count() or 1
    meta["load_average"] = load
    if device.type == "cpu" and load > cores:
        log(f"WARNING: load average {load:.1f} on {cores} cores: CPU timings here measure contention as much "
            f"as the code (threads: {torch.get_num_threads()})")
    if args.matmul_tflops:
        meta["matmul"] = {"tflops": args.matmul_tflops, "dtype": "bf16" if device.type == "cuda" else "fp32",
                          "source": "--matmul-tflops"}
    else:
        log("measuring the matmul peak")
        meta["matmul"] = measure_matmul_tflops(device, TINY["matmul_n"] if args.tiny else None)
    results: dict[str, Any] = {"meta": meta, "sections": list(args.sections)}
    bench = Bench(args, device, cfg, args.bf16, args.channels_last, results)
    print(f"msa.bench: {meta['device']}, torch {meta['torch']}, {meta['threads']} threads; preset {cfg.preset}"
          f"{' (--tiny: smoke sizes, not performance figures)' if args.tiny else ''}; image {cfg.image.backbone} "
          f"@{cfg.image.size}px, text {cfg.text.model} {cfg.text.config_overrides or ''}, "
          f"{cfg.text.max_tokens} tokens; bf16 {args.bf16}; matmul peak {fmt(meta['matmul']['tflops'])} TFLOP/s "
          f"({meta['matmul']['dtype']}, {meta['matmul']['source']})")
    with tempfile.TemporaryDirectory(prefix="msa-bench-") as tmp:
        bench.tmp = Path(tmp)
        for name in args.sections:
            t0 = time.perf_counter()
            results[name] = RUNNERS[name](bench)
            results[name]["section_s"] = time.perf_counter() - t0
    meta["maxrss_gib"] = maxrss_gib()
    if device.type == "cuda":
        _print_targets(results)
    else:
        print("\ntargets: GPU figures, not evaluated on the CPU")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2, default=str))
        log(f"wrote {args.json}")
    return 0


def _print_targets(results: dict[str, Any]) -> None:
    if results["meta"]["preset"] != "paper":
        print("\ntargets: set for the paper preset, not evaluated for preset " + results["meta"]["preset"])
        return
    lines = []
    ref_rate = REFERENCE["train"][32]["pairs_per_s"]
    train = {r["batch_size"]: r for r in results.get("train", {}).get("rows", []) if r.get("status") == "ok"}
    if 32 in train:
        x = train[32]["pairs_per_s"] / ref_rate
        lines.append(f"train B=32 >= {TARGETS['train_b32_x_ref']:g}x reference pairs/s: {x:.2f}x "
                     f"-> {'met' if x >= TARGETS['train_b32_x_ref'] else 'NOT met'}")
    big = [r for b, r in train.items() if b >= 256]
    if big and results["meta"]["bf16"]:
        x = max(r["pairs_per_s"] for r in big) / ref_rate
        lines.append(f"train B>=256 bf16 >= {TARGETS['train_b256_bf16_x_ref']:g}x reference: {x:.2f}x "
                     f"-> {'met' if x >= TARGETS['train_b256_bf16_x_ref'] else 'NOT met'}")
    m = {r["batch_size"]: r for r in results.get("mscmat", {}).get("rows", [])}
    if 128 in m and m[128].get("library_ms"):
        r = m[128]
        if r.get("naive_ms"):
            frac = r["library_ms"] / r["naive_ms"]
            lines.append(f"mscmat B=128 < 1/20 of naive time: {frac:.4f} -> "
                         f"{'met' if frac < TARGETS['mscmat_b128_naive_fraction'] else 'NOT met'}")
        g = r["library_mem_bytes"] / GIB
        lines.append(f"mscmat B=128 < 2 GiB: {g:.3f} GiB -> {'met' if g < TARGETS['mscmat_b128_gib'] else 'NOT met'}")
    ev = results.get("eval")
    if ev and not ev["scaled_down"]:
        lines.append(f"eval RSICD size < 3 s: {ev['total_s']:.2f} s -> {'met' if ev['total_s'] < 3 else 'NOT met'}")
    if lines:
        print("\ntargets (GPU):\n  " + "\n  ".join(lines))
