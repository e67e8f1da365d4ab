"""The ``crosschannel`` console script: one subcommand per entry point, each also runnable as ``python -m``."""
from __future__ import annotations

import importlib
import importlib.util
import sys

# subcommand -> (module with get_args_parser() and main(args), one-line help)
COMMANDS = {
    "quickstart": ("pretext.quickstart", "prior + short pretraining + colorized report on the embedded sample"),
    "prior": ("pretext.prior", "empirical ab prior of an image folder"),
    "pretrain": ("pretext.train", "pretrain a backbone by colorization (also: torchrun -m pretext.train)"),
    "colorize": ("pretext.colorize", "colorize photographs with a trained model"),
    "eval-color": ("pretext.eval_color", "score colorizations (AuC, rebalanced AuC, PSNR, classifier accuracy)"),
    "probe": ("linear_probe.train", "per-layer linear probes on a frozen encoder"),
    "probe-compare": ("linear_probe.compare", "overlay per-layer accuracy of several probe runs"),
    "svm": ("linear_probe.svm", "VOC07 linear SVM benchmark"),
    "turing-test": ("pretext.turing", "serve the colorization Turing test (real vs fake, in the browser)"),
    "turing-report": ("pretext.turing_report", "fooling rate per algorithm from a turing-test database"),
    "transfer": ("transfer.cli", "fine-tune on PASCAL VOC: transfer cls | det | det-eval | seg | seg-eval"),
    "export": ("transfer.export", "export a network for another framework (--format mmseg: backbone. prefix)"),
}


def _usage() -> str:
    lines = ["usage: crosschannel <command> [options]", "", "commands:"]
    for name, (mod, text) in COMMANDS.items():
        if importlib.util.find_spec(mod) is not None:
            lines.append(f"  {name:<14} {text}")
    lines.append("\n'crosschannel <command> --help' for a command's options.")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from .runtime import run_entry

    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS or importlib.util.find_spec(COMMANDS[name][0]) is None:
        print(f"crosschannel: unknown command '{name}'\n\n{_usage()}", file=sys.stderr)
        return 2
    mod = importlib.import_module(COMMANDS[name][0])
    parser = mod.get_args_parser()
    parser.prog = f"crosschannel {name}"
    return run_entry(mod.main, parser, rest)


if __name__ == "__main__":
    sys.exit(main())
