"""Fine-tuning FastVLM with PEFT (LoRA, QLoRA) and TRL: the data format, the collator, the adapter settings.

```python
import fastvlm_hf
from fastvlm_hf.training import FastVLMDataCollator, lora_config, load_rows, prepare_model_for_training
```

Rows are `{"images": [...], "messages": [...]}` (JSONL on disk, or a sequence of dicts such as a `datasets.Dataset`);
see `collator.py` for what the collator makes of them and `data.py` for the checks every row passes before training.
"""

from .adapters import check_trainable, lora_config, lora_target_modules, prepare_model_for_training
from .collator import IGNORE_INDEX, FastVLMDataCollator, RowError, load_image
from .data import BadRow, DataError, TrainingRows, find_bad_rows, load_rows, read_jsonl
from .trainer import SFT_DATA_SETTINGS, last_complete_checkpoint, merge_adapter, sft_trainer, to_dataset

__all__ = [
    "IGNORE_INDEX",
    "SFT_DATA_SETTINGS",
    "BadRow",
    "DataError",
    "FastVLMDataCollator",
    "RowError",
    "TrainingRows",
    "check_trainable",
    "find_bad_rows",
    "load_image",
    "last_complete_checkpoint",
    "load_rows",
    "merge_adapter",
    "lora_config",
    "lora_target_modules",
    "prepare_model_for_training",
    "read_jsonl",
    "sft_trainer",
    "to_dataset",
]
