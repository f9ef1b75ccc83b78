"""python -m flashlin <command>: `demo` (train a small language model, plot, sample) and
`recall` (multi-query associative recall across the mixers). `--help` after a command lists
its options."""
import argparse
import sys


def main(argv=None):
    from . import demo, recall
    parser = argparse.ArgumentParser(prog="python -m flashlin",
                                     description="flashlin's example programs.")
    commands = parser.add_subparsers(dest="command", metavar="command")
    commands.required = True
    demo.build_parser(commands.add_parser(
        "demo", help="train a small byte-level language model, save it, plot the loss, "
                     "generate a sample"))
    recall.build_parser(commands.add_parser(
        "recall", help="multi-query associative recall (MQAR) accuracy of each mixer"))
    args = parser.parse_args(argv)
    (demo if args.command == "demo" else recall).run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
