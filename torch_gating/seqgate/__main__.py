"""``python -m torch_gating.seqgate``: calibrate SeqGate on validation, enforce the guardrail, report on test.

Example (the embedded real model and text, no download)::

    python -m torch_gating.seqgate --model smollm2-135m --text pydoc --guardrail 0.01 --output report.json

The run's :class:`~torch_gating.seqgate.experiment.Settings` are built by :mod:`interop.config` from, later
ones winning: their defaults, ``--config file.yaml``, the flags given (``--guardrail``, ``--window``, ...) and
trailing ``key=value`` overrides of the same fields (``window=256 frontier=[0.02,0.05]``).

Prints the calibration choices, the guardrail steps, the test-split figures, the memory ablation and
the timing tables, and writes the same as JSON (atomically). Non-finite thresholds are written as the
strings ``"inf"`` / ``"-inf"`` (``tau = "-inf"``: never gate).

Exit status 2, with one line on stderr saying what is wrong, what was expected and how to fix it, when
the settings are invalid or the model or text cannot be used: a hub model offline (naming the offline
alternatives), a path that is not a model folder, an unsupported architecture, a text file that is not
UTF-8 text, a text too short for the windows the run needs. Exit status 130 on Ctrl-C, with the line
``interrupted: …`` saying what was written (the report and plot are written atomically at the end, so
never in part; a run cannot be resumed).
"""

from __future__ import annotations

import sys

try:
    # Importing torch and transformers takes seconds: a Ctrl-C meanwhile gets the same one line as later.
    import argparse
    import contextlib
    import json
    import signal
    import threading
    from dataclasses import asdict

    import torch
    from transformers.utils import logging as transformers_logging

    from interop._atomic import atomic_write_text
    from interop.config import ConfigError, apply_overrides, from_dict, read_yaml
    from interop.jsonsafe import json_safe
    from torch_gating.models import EMBEDDED_MODEL, ModelNotAvailableError, UnsupportedModelError, load_model
    from torch_gating.seqgate.experiment import (
        Settings,
        TextTooShortError,
        check_text_length,
        format_report,
        plot_frontier,
        run_seqgate,
    )
    from torch_gating.text import TextNotAvailableError, load_text
except KeyboardInterrupt:
    if __name__ != "__main__":
        raise
    print("interrupted: nothing was written (stopped while starting up); run the command again", file=sys.stderr)
    sys.exit(130)

EXIT_ERROR = 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT, what shells report for a command stopped by Ctrl-C


# Flags that set a Settings field: argparse dest -> field. Unset flags are None and leave the field alone.
SETTINGS_FLAGS = {
    "guardrail": "guardrail", "bl": "bl", "Bg": "Bg", "align": "align", "layers": "n_gated",
    "probe_tokens": "probe_tokens", "window": "window", "calibration_windows": "calibration_windows",
    "max_tokens": "max_tokens", "repeats": "repeats", "timing_windows": "timing_windows",
    "decode_prompt": "decode_prompt", "decode_tokens": "decode_tokens",
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m torch_gating.seqgate",
        description="Calibrate SeqGate on validation, enforce the guardrail, report on test.",
    )
    p.add_argument("--model", default=EMBEDDED_MODEL,
                   help="smollm2-135m (embedded), distilgpt2, gpt2, qwen2-0.5b, qwen2-1.5b, a local folder or a hub id")
    p.add_argument("--text", default="pydoc", help="pydoc (embedded), wikitext-2, or a text file")
    p.add_argument("--config", default=None,
                   help="YAML file of settings (the fields of torch_gating.seqgate.experiment.Settings)")
    p.add_argument("--guardrail", type=float, help="max ΔPPL on validation (0.01 = +1%%)")
    p.add_argument("--bl", type=float, help="per-layer budget: max fraction of a layer's blocks removed")
    p.add_argument("--Bg", type=float, help="global budget: max fraction of all gated layers' blocks removed")
    p.add_argument("--align", type=int, help="kept neuron counts are multiples of this (64 or 128)")
    p.add_argument("--layers", type=int, help="number of gated layers (default: a third of the layers)")
    p.add_argument("--probe-tokens", type=int, help="tokens probed at full width per sequence")
    p.add_argument("--window", type=int, help="tokens per window (perplexity, prefill, calibration)")
    p.add_argument("--calibration-windows", type=int,
                   help="validation windows used for calibration (each is scored with every layer pruned in turn)")
    p.add_argument("--max-tokens", type=int, help="tokens used of each split (validation, test)")
    p.add_argument("--repeats", type=int, help="timed repeats per arm (>= 5; 0 skips timing)")
    p.add_argument("--timing-windows", type=int, help="prefill windows per timed call")
    p.add_argument("--decode-prompt", type=int, help="prompt tokens before generation")
    p.add_argument("--decode-tokens", type=int, help="greedy tokens generated per timed call")
    p.add_argument("--frontier", default=None,
                   help="further guardrails to report with the same calibration, comma-separated (e.g. 0.02,0.05)")
    p.add_argument("--plot", default=None, help="write the tokens/s-vs-ΔPPL frontier plot (PNG) here")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: torch's choice; 1 is faster on a machine shared with other jobs)")
    p.add_argument("--output", default=None, help="write the JSON report here")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="settings overrides applied last, e.g. window=256 repeats=0 frontier=[0.02,0.05]")
    return p.parse_args(argv)


def settings_of(args: argparse.Namespace) -> Settings:
    """The run's :class:`Settings`: defaults (progress bars on), ``--config``, the flags given, then the
    ``key=value`` overrides, later ones winning; types and bounds checked by :mod:`interop.config`."""
    data = {"progress": True, **(read_yaml(args.config) if args.config else {})}
    data.update({key: getattr(args, dest) for dest, key in SETTINGS_FLAGS.items() if getattr(args, dest) is not None})
    if args.frontier is not None:
        try:
            data["frontier"] = tuple(float(g) for g in args.frontier.split(",") if g.strip())
        except ValueError as err:
            raise ConfigError(
                f"--frontier {args.frontier!r}: {err}; give comma-separated guardrails, e.g. 0.02,0.05"
            ) from None
    if args.no_progress:
        data["progress"] = False
    return from_dict(Settings, apply_overrides(data, args.overrides))


def fail(err: BaseException | str) -> int:
    """Print ``error: <message>`` on one line of stderr (whitespace collapsed) and return exit status 2."""
    print("error: " + " ".join(str(err).split()), file=sys.stderr)
    return EXIT_ERROR


def interrupted_message(args: argparse.Namespace | None, written: list[str]) -> str:
    """The one line printed on Ctrl-C: what was written and what was not; the run itself cannot be resumed."""
    wanted = [(kind, path) for kind, path in (("report", getattr(args, "output", None)),
                                              ("plot", getattr(args, "plot", None))) if path]
    if not written:
        if not wanted:
            return "interrupted: nothing was written (a run cannot be resumed); run the command again to start over"
        names = " and ".join(str(path) for _, path in wanted)
        return (f"interrupted: nothing was written ({names}: written only when a run completes, never in part; an "
                "earlier file there is left as it was); run the command again to start over")
    parts = [f"the {kind} {path} was {'written' if str(path) in written else 'not'}" for kind, path in wanted]
    return f"interrupted: {'; '.join(parts)} (a run cannot be resumed: run the command again to make it)"


@contextlib.contextmanager
def sigint_ignored():
    """Ignore a further Ctrl-C while the interruption is reported (main thread only; restored after)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


@contextlib.contextmanager
def transformers_progress_bars(enabled: bool):
    """transformers' and the hub's progress bars (e.g. "Loading weights") off when ``enabled`` is False."""
    was_enabled = transformers_logging.is_progress_bar_enabled()
    if not enabled:
        transformers_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled and not enabled:
            transformers_logging.enable_progress_bar()


def main(argv: list[str] | None = None) -> int:
    args, written = None, []
    try:
        args = parse_args(argv)
        try:
            settings = settings_of(args)
        except ConfigError as err:
            # A rule between fields (Settings.__post_init__) is reported in its own words.
            return fail(err.__cause__ if isinstance(err.__cause__, ValueError) else err)
        with transformers_progress_bars(settings.progress):
            return _main(args, settings, written)
    except KeyboardInterrupt:
        with sigint_ignored():
            print(interrupted_message(args, written), file=sys.stderr)
        return EXIT_INTERRUPTED


def _main(args: argparse.Namespace, settings: Settings, written: list[str]) -> int:
    """The run; appends each output file to ``written`` once it is completely in place."""
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    try:
        corpus = load_text(args.text)
        model, tokenizer, info = load_model(args.model, device=args.device)
        check_text_length(tokenizer, corpus, settings, label=args.text)
    except (ModelNotAvailableError, UnsupportedModelError, TextNotAvailableError, TextTooShortError) as err:
        return fail(err)
    report = run_seqgate(model, tokenizer, corpus, settings, model_info=asdict(info))
    print(format_report(report))
    if args.output:
        atomic_write_text(args.output, json.dumps(json_safe(report), indent=2, allow_nan=False) + "\n")
        written.append(str(args.output))
        print(f"\nreport written to {args.output}")
    if args.plot:
        plot_frontier(report["frontier"], args.plot)  # atomic too
        written.append(str(args.plot))
        print(f"frontier plot written to {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
