"""`python -m dowser.integrations.llamafactory cfg.yaml` (LLaMA-Factory's run_exp with dowser's
callback) on a tiny local Llama and a tiny local dataset; then the issue-26 checks (frozen
entries, masks file, delta, resume bit-exact). Run by tests/frameworks/run.sh llamafactory
inside LLaMA-Factory's own environment."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time

from tiny import PROBE, assert_resumed, check_run, cipher_rows, write_jsonl, write_model


def config(work: str, out: str, resume: str | None = None) -> str:
    import yaml

    cfg = {"model_name_or_path": os.path.join(work, "model"), "trust_remote_code": False,
           "stage": "sft", "do_train": True, "finetuning_type": "full",
           "dataset": "cipher", "dataset_dir": work, "template": "default", "cutoff_len": 32,
           "overwrite_cache": True, "output_dir": out, "overwrite_output_dir": True,
           "per_device_train_batch_size": 8, "gradient_accumulation_steps": 1,
           "learning_rate": 0.01, "weight_decay": 0.1, "lr_scheduler_type": "constant",
           "warmup_ratio": 0.0, "max_steps": 6, "save_steps": 3, "logging_steps": 1,
           "save_only_model": False, "seed": 0, "data_seed": 0, "report_to": "none",
           "bf16": False, "fp16": False, "dataloader_num_workers": 0, "plot_loss": False,
           "dowser": dict(PROBE)}
    if resume:
        cfg["resume_from_checkpoint"] = resume
        cfg["overwrite_output_dir"] = False
    path = os.path.join(work, f"cfg-{os.path.basename(out)}.yaml")
    with open(path, "w") as f:
        yaml.safe_dump(cfg, f)
    return path


def torchaudio_stub(work: str) -> str | None:
    """LLaMA-Factory 0.9.5 imports torchaudio at module level (llamafactory/data/mm_plugin.py,
    used only to load audio). PyPI has no torchaudio for torch 2.13 and its CUDA wheels fail on
    the CPU torch (OSError: libc10_cuda.so: cannot open shared object file). When the real one
    does not import, a stub that refuses any use stands in for this text-only run."""
    try:
        import torchaudio  # noqa: F401
        return None
    except (ImportError, OSError) as err:
        print(f"torchaudio does not import ({err}); using a stub for the text-only run", flush=True)
    folder = os.path.join(work, "stubs", "torchaudio")
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "__init__.py"), "w") as f:
        f.write("def __getattr__(name):\n"
                "    raise ImportError(f'torchaudio stub (dowser framework check): {name}')\n")
    return os.path.dirname(folder)


def launch(cfg: str, stubs: str | None) -> float:
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "HF_HUB_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false", "DISABLE_VERSION_CHECK": "1"}
    if stubs:
        env["PYTHONPATH"] = stubs + os.pathsep + env.get("PYTHONPATH", "")
    cmd = [sys.executable, "-m", "dowser.integrations.llamafactory", cfg]
    print("$", " ".join(cmd), flush=True)
    t0 = time.time()
    subprocess.run(cmd, check=True, env=env)
    return time.time() - t0


def main() -> None:
    work = sys.argv[1] if len(sys.argv) > 1 else tempfile.mkdtemp(prefix="dowser-lf-")
    os.makedirs(work, exist_ok=True)
    write_model(os.path.join(work, "model"))
    write_jsonl(os.path.join(work, "data.jsonl"),
                [{"instruction": r["prompt"], "input": "", "output": r["answer"]} for r in cipher_rows()])
    with open(os.path.join(work, "dataset_info.json"), "w") as f:
        json.dump({"cipher": {"file_name": "data.jsonl"}}, f)
    full, resumed = os.path.join(work, "full"), os.path.join(work, "resumed")
    stubs = torchaudio_stub(work)
    t_full = launch(config(work, full), stubs)
    ckpt = os.path.join(full, "checkpoint-3")
    assert os.path.isfile(os.path.join(ckpt, "dowser_masks.safetensors")), "no masks in checkpoint-3"
    t_res = launch(config(work, resumed, resume=ckpt), stubs)
    assert_resumed(resumed)
    report = check_run(os.path.join(work, "model"), full, resumed,
                       os.path.join(full, "dowser_masks.safetensors"),
                       os.path.join(full, "dowser_delta.safetensors"))
    print(f"LLAMAFACTORY OK {report} wall: full run {t_full:.0f}s, resumed run {t_res:.0f}s")


if __name__ == "__main__":
    main()
