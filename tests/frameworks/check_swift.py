"""`swift sft --external_plugins dowser_plugin.py --optimizer dowser` on a tiny local Llama and
a tiny local dataset; then the issue-26 checks (frozen entries, masks file, delta, resume
bit-exact). Run by tests/frameworks/run.sh swift inside ms-swift's own environment."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

from tiny import PROBE, assert_resumed, check_run, cipher_rows, write_jsonl, write_model


def swift_sft(work: str, out: str, resume: str | None = None) -> float:
    cmd = [shutil.which("swift") or "swift", "sft",
           "--model", os.path.join(work, "model"), "--model_type", "llama", "--template", "default",
           "--tuner_type", "full", "--torch_dtype", "float32",
           "--dataset", os.path.join(work, "data.jsonl"), "--split_dataset_ratio", "0",
           "--max_length", "32", "--per_device_train_batch_size", "8",
           "--gradient_accumulation_steps", "1", "--max_steps", "6", "--save_steps", "3",
           "--save_strategy", "steps", "--learning_rate", "1e-2", "--weight_decay", "0.1",
           "--lr_scheduler_type", "constant", "--warmup_ratio", "0", "--logging_steps", "1",
           "--seed", "0", "--data_seed", "0", "--dataloader_num_workers", "0",
           "--dataset_num_proc", "1", "--report_to", "none", "--output_dir", out,
           "--add_version", "false", "--save_only_model", "false", "--check_model", "false",
           "--external_plugins", os.path.join(work, "dowser_plugin.py"), "--optimizer", "dowser"]
    if resume:
        cmd += ["--resume_from_checkpoint", resume]
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "HF_HUB_OFFLINE": "1",
           "MODELSCOPE_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    print("$", " ".join(cmd), flush=True)
    t0 = time.time()
    subprocess.run(cmd, check=True, env=env)
    return time.time() - t0


def main() -> None:
    work = sys.argv[1] if len(sys.argv) > 1 else tempfile.mkdtemp(prefix="dowser-swift-")
    os.makedirs(work, exist_ok=True)
    write_model(os.path.join(work, "model"))
    write_jsonl(os.path.join(work, "data.jsonl"),
                [{"messages": [{"role": "user", "content": r["prompt"]},
                               {"role": "assistant", "content": r["answer"]}]}
                 for r in cipher_rows()])
    with open(os.path.join(work, "dowser_plugin.py"), "w") as f:
        f.write("from dowser.integrations.swift import register\n"
                f"register(**{json.dumps(PROBE)})\n")
    full, resumed = os.path.join(work, "full"), os.path.join(work, "resumed")
    t_full = swift_sft(work, full)
    ckpt = os.path.join(full, "checkpoint-3")
    assert os.path.isfile(os.path.join(ckpt, "dowser_masks.safetensors")), "no masks in checkpoint-3"
    t_res = swift_sft(work, resumed, resume=ckpt)
    # swift saves the final weights in the last checkpoint folder
    assert_resumed(resumed)
    report = check_run(os.path.join(work, "model"), os.path.join(full, "checkpoint-6"),
                       os.path.join(resumed, "checkpoint-6"),
                       os.path.join(full, "dowser_masks.safetensors"),
                       os.path.join(full, "dowser_delta.safetensors"))
    print(f"SWIFT OK {report} wall: full run {t_full:.0f}s, resumed run {t_res:.0f}s")


if __name__ == "__main__":
    main()
