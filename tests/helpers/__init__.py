"""What the tests import: tiny tokenizers, models and checkpoints, the command lines of the CLI tests, and the
scripts that tests run in subprocesses. Fixtures stay in conftest.py."""
