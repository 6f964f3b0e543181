"""Hugging Face interop: published checkpoints in and out of bigjax runs, proven against transformers.

    config = hf.config_from_hf(hf_dir)          # a bigjax config from config.json (refuses what it cannot be)
    hf.import_hf(hf_dir, workdir)               # a workdir at step 0: checkpoint, config.json, tokenizer
    hf.export(workdir, out_dir, step=None)      # a directory transformers' from_pretrained loads
    hf.check_architecture(config, hf_dir)       # init_from.workdir=hf:PATH: the run's model is the checkpoint's
    hf.load_selected(params, hf_dir, ...)       # and its weights

Modules: `files` (the directory on disk, lazy tensor views, sharded safetensors), `family` (which architectures
map, and the interface each family module has), one module per family (`gpt2`, `llama`: with Mistral, Qwen2 and the
mixtures of experts Mixtral and Qwen2-MoE, `bert`, `vit`, `resnet`),
`convert` (the above).
"""

from bigjax.hf.common import HFError
from bigjax.hf.convert import SOURCE_FILE, check_architecture, config_from_hf, export, import_hf, load_selected
from bigjax.hf.files import INDEX_FILE, SINGLE_FILE, TensorReader

__all__ = [
    "INDEX_FILE",
    "SINGLE_FILE",
    "SOURCE_FILE",
    "HFError",
    "TensorReader",
    "check_architecture",
    "config_from_hf",
    "export",
    "import_hf",
    "load_selected",
]
