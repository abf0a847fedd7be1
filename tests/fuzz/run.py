"""Run one fuzz target under atheris (libFuzzer): ``python tests/fuzz/run.py TARGET [libFuzzer args]``.

Writes the seed corpus of the target into the first corpus directory given (creating it)
before starting, so a fresh run starts from the dialog files. Prefer ``scripts/fuzz``,
which picks the directories and prints a summary.
"""

from __future__ import annotations

import sys
from pathlib import Path

import atheris

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

with atheris.instrument_imports(include=["hato"]):
    import hato.mailer  # noqa: F401  (instrumented for the compose target)
    from fuzz.targets import TARGETS, seeds


def main() -> None:
    if len(sys.argv) < 2 or sys.argv[1] not in TARGETS:
        sys.exit(f"usage: run.py {{{','.join(TARGETS)}}} [CORPUS_DIR] [libFuzzer options]")
    name = sys.argv[1]
    args = [sys.argv[0], *sys.argv[2:]]
    corpus = next((a for a in args[1:] if not a.startswith("-")), None)
    if corpus is not None:
        folder = Path(corpus)
        folder.mkdir(parents=True, exist_ok=True)
        for i, seed in enumerate(seeds(name)):
            path = folder / f"seed-{i:04d}"
            if not path.exists():
                path.write_bytes(seed)
    atheris.Setup(args, TARGETS[name])
    atheris.Fuzz()


if __name__ == "__main__":
    main()
