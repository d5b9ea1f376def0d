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
import warnings


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
        _import_package(spec, package)
    except BaseException:
        for name in [name for name in sys.modules if name == "fastvlm_hf" or name.startswith("fastvlm_hf.")]:
            del sys.modules[name]  # a later `import fastvlm_hf` starts over
        raise
    return cli.run(args)


def _import_package(spec, package) -> None:
    """Runs the package's `__init__`; its notice of an untested transformers release becomes one line of the command's
    own instead of a Python warning with a file name and a source line. Other warnings show as they would."""
    with warnings.catch_warnings(record=True) as caught:
        spec.loader.exec_module(package)
    for warning in caught:
        if issubclass(warning.category, package.UntestedTransformersWarning):
            print(f"fastvlm-hf: note: {warning.message}", file=sys.stderr)
        else:
            warnings.showwarning(warning.message, warning.category, warning.filename, warning.lineno)


if __name__ == "__main__":
    sys.exit(main())
