"""``python -m torch_gating.seqgate``: calibrate SeqGate on validation, enforce the guardrail, report on test.

Example (the embedded real model and text, no download)::

    python -m torch_gating.seqgate --model smollm2-135m --text pydoc --guardrail 0.01 --output report.json

Prints the calibration choices, the guardrail steps, the test-split figures, the memory ablation and
the timing tables, and writes the same as JSON (atomically). Non-finite thresholds are written as the
strings ``"inf"`` / ``"-inf"`` (``tau = "-inf"``: never gate). Exit status 2 when the model or text
cannot be obtained (e.g. a hub model offline), with a message naming the offline alternatives.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import asdict

import torch

from interop._atomic import atomic_write_text
from torch_gating.models import EMBEDDED_MODEL, ModelNotAvailableError, load_model
from torch_gating.seqgate.report import Settings, format_report, plot_frontier, run_seqgate
from torch_gating.text import TextNotAvailableError, load_text


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    defaults = Settings()
    p = argparse.ArgumentParser(
        prog="python -m torch_gating.seqgate",
        description="Calibrate SeqGate on validation, enforce the guardrail, report on test.",
    )
    p.add_argument("--model", default=EMBEDDED_MODEL,
                   help="smollm2-135m (embedded), distilgpt2, gpt2, qwen2-0.5b, qwen2-1.5b, a local folder or a hub id")
    p.add_argument("--text", default="pydoc", help="pydoc (embedded), wikitext-2, or a text file")
    p.add_argument("--guardrail", type=float, default=defaults.guardrail, help="max ΔPPL on validation (0.01 = +1%%)")
    p.add_argument("--bl", type=float, default=defaults.bl, help="per-layer budget: max fraction of a layer's blocks removed")
    p.add_argument("--Bg", type=float, default=defaults.Bg, help="global budget: max fraction of all gated layers' blocks removed")
    p.add_argument("--align", type=int, default=defaults.align, help="kept neuron counts are multiples of this (64 or 128)")
    p.add_argument("--layers", type=int, default=None, help="number of gated layers (default: a third of the layers)")
    p.add_argument("--probe-tokens", type=int, default=defaults.probe_tokens, help="tokens probed at full width per sequence")
    p.add_argument("--window", type=int, default=defaults.window, help="tokens per window (perplexity, prefill, calibration)")
    p.add_argument("--calibration-windows", type=int, default=defaults.calibration_windows,
                   help="validation windows used for calibration (each is scored with every layer pruned in turn)")
    p.add_argument("--max-tokens", type=int, default=defaults.max_tokens, help="tokens used of each split (validation, test)")
    p.add_argument("--repeats", type=int, default=defaults.repeats, help="timed repeats per arm (>= 5; 0 skips timing)")
    p.add_argument("--timing-windows", type=int, default=defaults.timing_windows, help="prefill windows per timed call")
    p.add_argument("--decode-prompt", type=int, default=defaults.decode_prompt, help="prompt tokens before generation")
    p.add_argument("--decode-tokens", type=int, default=defaults.decode_tokens, help="greedy tokens generated per timed call")
    p.add_argument("--frontier", default="",
                   help="further guardrails to report with the same calibration, comma-separated (e.g. 0.02,0.05)")
    p.add_argument("--plot", default=None, help="write the tokens/s-vs-ΔPPL frontier plot (PNG) here")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: torch's choice; 1 is faster on a machine shared with other jobs)")
    p.add_argument("--output", default=None, help="write the JSON report here")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p.parse_args(argv)


def json_ready(value):
    """``value`` with non-finite floats as the strings "inf" / "-inf" / "nan" (JSON has no such numbers)."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {str(k): json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_ready(v) for v in value]
    return value


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        frontier = tuple(float(g) for g in args.frontier.split(",") if g.strip())
        settings = Settings(
            guardrail=args.guardrail, bl=args.bl, Bg=args.Bg, align=args.align, n_gated=args.layers,
            probe_tokens=args.probe_tokens, window=args.window, calibration_windows=args.calibration_windows,
            max_tokens=args.max_tokens, repeats=args.repeats, timing_windows=args.timing_windows,
            decode_prompt=args.decode_prompt, decode_tokens=args.decode_tokens, frontier=frontier,
            progress=not args.no_progress,
        )
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    try:
        corpus = load_text(args.text)
        model, tokenizer, info = load_model(args.model, device=args.device)
    except (ModelNotAvailableError, TextNotAvailableError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    report = run_seqgate(model, tokenizer, corpus, settings, model_info=asdict(info))
    print(format_report(report))
    if args.output:
        atomic_write_text(args.output, json.dumps(json_ready(report), indent=2, allow_nan=False) + "\n")
        print(f"\nreport written to {args.output}")
    if args.plot:
        plot_frontier(report["frontier"], args.plot)
        print(f"frontier plot written to {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
