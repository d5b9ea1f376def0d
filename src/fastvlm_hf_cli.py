"""The ``fastvlm-hf`` command's entry point (``python -m fastvlm_hf_cli`` runs it too); the command itself is
``fastvlm_hf.cli``.

``import fastvlm_hf`` registers FastVLM with transformers' Auto classes, which imports transformers and torch: seconds,
which ``--help``, ``--version`` and a mistyped option do not need. The parser (``fastvlm_hf.cli``) imports neither, so
this module imports it beneath a ``fastvlm_hf`` package whose ``__init__`` has not run yet, and runs that ``__init__``
once the arguments are parsed, before the command starts: every command sees the package fully imported.
"""

import importlib
import importlib.util
import sys


def main(argv: list[str] | None = None) -> int:
    if "fastvlm_hf" in sys.modules:
        from fastvlm_hf.cli import main as run_command

        return run_command(argv)
    spec = importlib.util.find_spec("fastvlm_hf")
    package = importlib.util.module_from_spec(spec)
    sys.modules["fastvlm_hf"] = package
    try:
        cli = importlib.import_module("fastvlm_hf.cli")
        args = cli.build_parser().parse_args(argv)  # --help, --version and usage errors exit here
        spec.loader.exec_module(package)
    except BaseException:
        for name in [name for name in sys.modules if name == "fastvlm_hf" or name.startswith("fastvlm_hf.")]:
            del sys.modules[name]  # a later `import fastvlm_hf` starts over
        raise
    return cli.run(args)


if __name__ == "__main__":
    sys.exit(main())
