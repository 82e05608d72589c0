import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # the single-file scripts (train_grpo.py, ...) import as modules
DATA_DIR = REPO.parent / "shared" / "data"
HOTPOT_HF = DATA_DIR / "hotpotqa_dev_distractor_100.json"
HOTPOT_OFFICIAL = DATA_DIR / "hotpotqa_dev_distractor_official_53.json"
FIXTURES = Path(__file__).resolve().parent / "fixtures"


@pytest.fixture(scope="session")
def hotpot_path() -> Path:
    if not HOTPOT_HF.is_file():
        pytest.fail(f"the shared HotpotQA sample is missing: expected {HOTPOT_HF} (../shared beside the checkout)")
    return HOTPOT_HF


@pytest.fixture(scope="session")
def vllm_serve(tmp_path_factory):
    """`vllm serve` on 127.0.0.1 with the tiny model, served as "tiny": its OpenAI-compatible base URL."""
    pytest.importorskip("vllm")
    from agents.vllm_backend import hf_directory

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    directory = tmp_path_factory.mktemp("vllm_serve")
    log = open(directory / "server.log", "w")
    server = subprocess.Popen(
        [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", hf_directory("tiny"),
         "--served-model-name", "tiny", "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32",
         "--gpu-memory-utilization", "0.3", "--enforce-eager"],  # the protocol is tested, not compilation: ~25 s less
        cwd=directory, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"})
    try:
        deadline = time.time() + 300
        while True:
            assert server.poll() is None, (directory / "server.log").read_text()[-3000:]
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
                break
            except OSError:
                assert time.time() < deadline, "vllm serve did not come up in 300 s"
                time.sleep(2)
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        server.terminate()
        server.wait(timeout=60)
        log.close()
