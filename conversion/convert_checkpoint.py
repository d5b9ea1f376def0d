"""Convert a FastVLM checkpoint of any layout into this package's layout, or into transformers' native one.

The same as the installed `fastvlm-hf convert` command (`fastvlm_hf.cli`, which runs `fastvlm_hf.conversion`),
for a source checkout; it takes the same arguments:

    python conversion/convert_checkpoint.py apple/FastVLM-0.5B FastVLM-0.5B-hf --verify
    python conversion/convert_checkpoint.py apple/FastVLM-0.5B FastVLM-0.5B-native --to transformers --verify
    python conversion/convert_checkpoint.py apple/FastVLM-0.5B FastVLM-0.5B-hf --verify --push-to-hub me/FastVLM-0.5B-hf
"""

import sys

from fastvlm_hf.cli import main

if __name__ == "__main__":
    sys.exit(main(["convert", *sys.argv[1:]]))
