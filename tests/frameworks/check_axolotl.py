"""`axolotl train cfg.yml` with dowser's plugin on a tiny local Llama and a tiny local dataset;
then the issue-26 checks (frozen entries, masks file, delta, resume bit-exact).
Run by tests/frameworks/run_axolotl.sh inside Axolotl's own environment."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time

from tiny import PROBE, assert_resumed, check_run, cipher_rows, write_jsonl, write_model, ROOT  # noqa: F401


def config(work: str, out: str, resume: str | None = None) -> str:
    import yaml

    cfg = {
        "base_model": os.path.join(work, "model"),
        "tokenizer_type": "PreTrainedTokenizerFast",
        "datasets": [{"path": os.path.join(work, "data.jsonl"), "ds_type": "json",
                      "type": "completion", "field": "text"}],
        "dataset_prepared_path": os.path.join(work, "prepared"),
        "val_set_size": 0.0,
        "sequence_len": 16,
        "sample_packing": False,
        "micro_batch_size": 8,
        "gradient_accumulation_steps": 1,
        "max_steps": 6,
        "num_epochs": 1,
        "learning_rate": 0.01,
        "weight_decay": 0.1,
        "lr_scheduler": "constant",
        "warmup_steps": 0,
        "optimizer": "adamw_torch",
        "save_steps": 3,
        "save_strategy": "steps",
        "save_safetensors": True,
        "output_dir": out,
        "seed": 0,
        "bf16": False,
        "fp16": False,
        "tf32": False,
        "logging_steps": 1,
        "dataloader_num_workers": 0,
        "save_only_model": False,
        "plugins": ["dowser.integrations.axolotl.DowserPlugin"],
        "dowser": dict(PROBE),
    }
    if resume:
        cfg["resume_from_checkpoint"] = resume
    path = os.path.join(work, f"cfg-{os.path.basename(out)}.yml")
    with open(path, "w") as f:
        yaml.safe_dump(cfg, f)
    return path


def axolotl_train(cfg: str) -> float:
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "TOKENIZERS_PARALLELISM": "false",
           "HF_HUB_OFFLINE": "1", "WANDB_DISABLED": "true", "AXOLOTL_DO_NOT_TRACK": "1", "ACCELERATE_USE_CPU": "1"}
    t0 = time.time()
    cli = shutil.which("axolotl")
    cmd = [cli, "train", cfg] if cli else [sys.executable, "-m", "axolotl.cli.train", cfg]
    print("$", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, env=env)
    return time.time() - t0


def main() -> None:
    work = sys.argv[1] if len(sys.argv) > 1 else tempfile.mkdtemp(prefix="dowser-axolotl-")
    os.makedirs(work, exist_ok=True)
    write_model(os.path.join(work, "model"))
    write_jsonl(os.path.join(work, "data.jsonl"), cipher_rows())
    full, resumed = os.path.join(work, "full"), os.path.join(work, "resumed")
    t_full = axolotl_train(config(work, full))
    ckpt = os.path.join(full, "checkpoint-3")
    assert os.path.isfile(os.path.join(ckpt, "dowser_masks.safetensors")), "no masks in checkpoint-3"
    t_res = axolotl_train(config(work, resumed, resume=ckpt))
    assert_resumed(resumed)
    report = check_run(os.path.join(work, "model"), full, resumed,
                       os.path.join(full, "dowser_masks.safetensors"),
                       os.path.join(full, "dowser_delta.safetensors"))
    print(f"AXOLOTL OK {report} wall: full run {t_full:.0f}s, resumed run {t_res:.0f}s")


if __name__ == "__main__":
    main()
