"""The CUDA suite (``pytest -m cuda``): every GPU path end to end on one device.

Skipped, with the reason "no CUDA device", where no GPU is visible (every CI machine). On the device
machine ``benchmarks/gpu_check.sh`` runs it: the ddp backend in fp32/bf16/fp16 (GradScalers), DeepSpeed
ZeRO 0/1/2 in bf16 and fp16 (the dtype audit), the flash attention kernel, ``trainer.compile=true``
compiled, nvJPEG decoding against the CPU's, an asynchronous checkpoint of CUDA tensors resumed,
``sagan sample`` and ``sagan eval`` on CUDA, and no host synchronisation in a steady-state step.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from tests.support.datasets import prepare_digits
from tests.support.host_syncs import HostSyncCounter
from tests.support.paths import CONFIGS, ROOT
from tests.trainer.test_dtype_audit import audit, check_result

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device"),
]

TINY = [
    "model.g_channels=8", "model.d_channels=8", "model.z_dim=16", "trainer.global_batch_size=8",
    "data.num_workers=0", "metrics.port=0", "trainer.device=cuda", "trainer.log_interval=1000",
    "trainer.sample_interval=1000",
]  # fmt: skip
TIMEOUT = 900


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> str:
    return str(prepare_digits(tmp_path_factory.mktemp("cuda") / "digits-32"))


def sagan(*args: str) -> subprocess.CompletedProcess:
    """The CLI as ``python -m launch.cli`` (the device machine runs the checkout from PYTHONPATH)."""
    done = subprocess.run(
        [sys.executable, "-m", "launch.cli", *args], cwd=ROOT, capture_output=True, text=True,
        timeout=TIMEOUT, env={**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-4000:]
    return done


def trainer_for(digits: str, run_dir, *overrides: str):
    from trainer.config import load_config
    from trainer.runtime.distributed import init_runtime
    from trainer.trainer import Trainer

    cfg = load_config(CONFIGS / "smoke.yaml", [f"data.url={digits}", f"run.dir={run_dir}", *TINY, *overrides])
    return Trainer(cfg, init_runtime("cuda"))


@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_ddp_trains_on_cuda(digits, tmp_path, precision):
    trainer = trainer_for(digits, tmp_path, f"trainer.precision={precision}", "trainer.max_steps=6")
    trainer.train()
    assert trainer.runtime.device.type == "cuda"
    assert all(p.is_cuda for p in trainer.backend.G.parameters())
    scales = trainer.backend.loss_scales()
    assert (scales["g"] > 1) == (precision == "fp16")  # fp16: the GradScalers' dynamic scale
    assert all(torch.isfinite(p).all() for p in trainer.backend.G.parameters())


@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_ddp_dtype_audit_on_cuda(precision):
    check_result(f"ddp {precision} cuda", precision, audit("ddp", precision, device="cuda"))


WORKER = """
import json
from tests.trainer.test_dtype_audit import audit
print("AUDIT " + json.dumps({f"{stage} {p}": audit("deepspeed", p, stage, device="cuda")
                             for stage in (0, 1, 2) for p in ("bf16", "fp16")}))
"""


def test_deepspeed_zero_0_1_2_bf16_fp16_on_cuda():
    done = subprocess.run(
        [sys.executable, "-c", WORKER], cwd=ROOT, capture_output=True, text=True, timeout=TIMEOUT,
        env={**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-4000:]
    line = next(line for line in done.stdout.splitlines() if line.startswith("AUDIT "))
    for name, result in json.loads(line.removeprefix("AUDIT ")).items():
        check_result(f"deepspeed ZeRO {name} cuda", name.split()[1], result)


def test_attention_takes_the_flash_kernel_on_cuda():
    from torch.nn.attention import SDPBackend

    from models.attention import SelfAttention2d

    block = SelfAttention2d(256, impl="sdpa").cuda()
    x = torch.randn(8, 256, 64, 64, device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        query, key, value = block.sdpa_inputs(x)
        chosen = torch._fused_sdp_choice(query.bfloat16(), key.bfloat16(), value.bfloat16(), scale=1.0)
        out = block(x)
    assert SDPBackend(chosen) == SDPBackend.FLASH_ATTENTION
    assert out.shape == x.shape


def test_compile_is_compiled_not_eager_on_cuda(digits, tmp_path):
    import torch._dynamo.utils

    from trainer.backends.compilation import compiler_missing

    assert compiler_missing(torch.device("cuda")) is None
    torch._dynamo.utils.counters.clear()
    trainer = trainer_for(
        digits, tmp_path, "trainer.compile=true", "trainer.max_steps=3", "trainer.precision=bf16"
    )
    trainer.train()
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > 0
    assert not torch._dynamo.utils.counters["graph_break"], dict(torch._dynamo.utils.counters["graph_break"])


def test_nvjpeg_decodes_as_the_cpu_does_within_jpegs_tolerance():
    from PIL import Image

    from data_pipeline.encodings import decode_pixels
    from data_pipeline.gpu_jpeg import gpu_jpeg_decoder

    decoder = gpu_jpeg_decoder("cuda", image_format="jpeg", image_size=64, resolution=64)
    assert decoder is not None
    rng = np.random.default_rng(0)
    jpegs = []
    for slot in range(4):
        pixels = (rng.random((64, 64, 3)) * 255).astype(np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
        jpegs.append((slot, buffer.getvalue()))
    images, failed = decoder.decode(torch.zeros(4, 3, 64, 64, dtype=torch.uint8), jpegs)
    torch.cuda.synchronize()
    assert not failed and images.is_cuda
    for slot, data in jpegs:
        cpu = torch.from_numpy(np.ascontiguousarray(decode_pixels(data, "jpg", 64).transpose(2, 0, 1)))
        difference = (images[slot].cpu().int() - cpu.int()).abs()
        assert difference.float().mean() < 1.0 and difference.max() <= 8  # IDCT rounding differs


def test_async_checkpoint_of_cuda_tensors_resumes(digits, tmp_path):
    from trainer.checkpoint.format import load_folder

    first = trainer_for(digits, tmp_path, "trainer.max_steps=4", "checkpoint.interval_steps=2")
    first.train()
    expected = {k: v.detach().cpu() for k, v in first.backend.G.state_dict().items()}
    state, manifest = load_folder(tmp_path / "checkpoints" / "step_4")
    assert manifest["step"] == 4
    for key, value in expected.items():  # the snapshot of CUDA tensors, bit for bit
        assert torch.equal(state["backend"]["G"][key], value), key
    resumed = trainer_for(digits, tmp_path, "trainer.max_steps=6", "checkpoint.interval_steps=2")
    resumed.train()
    assert resumed.step == 6
    assert load_folder(tmp_path / "checkpoints" / "step_6")[1]["step"] == 6


def test_sagan_sample_and_eval_on_cuda(digits, tmp_path):
    run = tmp_path / "run"
    sagan("train", "--config", str(CONFIGS / "smoke.yaml"), f"data.url={digits}", f"run.dir={run}",
          *TINY, "trainer.max_steps=2", "eval.metrics=[]")  # fmt: skip
    grid = tmp_path / "grid.png"
    sagan("sample", "--checkpoint", str(run), "--out", str(grid))
    assert grid.read_bytes()[:4] == b"\x89PNG"
    out = tmp_path / "eval.json"
    sagan(
        "eval",
        "--checkpoint",
        str(run),
        "--num-samples",
        "64",
        "--metrics",
        "fid,accuracy",
        "--out",
        str(out),
    )
    (result,) = json.loads(out.read_text())
    assert result["metrics"]["fid"] >= 0


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_no_host_synchronisation_in_a_steady_state_step_on_cuda(digits, tmp_path, precision):
    steps = 4
    trainer = trainer_for(
        digits, tmp_path, f"trainer.precision={precision}", f"trainer.max_steps={steps}",
        "checkpoint.interval_steps=1000", "checkpoint.resume=false",
    )  # fmt: skip
    with HostSyncCounter(lambda: trainer.step) as counter:
        trainer.train()
    steady = [counter.by_step[step] for step in range(1, steps)]
    assert max(steady) == 0, steady


def test_out_of_memory_leaves_the_allocators_snapshot_with_the_step_and_the_batch(digits, tmp_path):
    """The caching allocator refuses the first step's memory (capped 64 MiB above what the model and
    its set-up hold; G's first activation at batch 1,024 and width 256 is 1 GiB): a real CUDA
    out-of-memory error, with the allocation history recorded; the snapshot memory_viz reads."""
    import pickle

    from trainer.runtime.watchdog import OutOfMemory

    trainer = trainer_for(
        digits, tmp_path, "trainer.max_steps=4", "trainer.memory_history=10000",
        "trainer.global_batch_size=1024", "model.g_channels=256",
    )  # fmt: skip
    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.set_per_process_memory_fraction((torch.cuda.memory_reserved() + 64 * 2**20) / total)
    try:
        with pytest.raises(
            OutOfMemory, match=r"ran out of memory in step 1 with batches of shape \[1024, 3, 32, 32\]"
        ):
            trainer.train()
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)
        torch.cuda.memory._record_memory_history(enabled=None)
    text = (tmp_path / "diagnostics" / "step_1" / "rank_0.txt").read_text()
    assert "out of memory on cuda" in text and "CUDA out of memory" in text and "phase D step" in text
    assert "memory snapshot: " + str(tmp_path / "diagnostics" / "step_1" / "rank_0-memory.pickle") in text
    snapshot = pickle.loads((tmp_path / "diagnostics" / "step_1" / "rank_0-memory.pickle").read_bytes())
    assert snapshot["segments"] and snapshot["device_traces"][0]  # blocks, and the recorded allocations
