import sys
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
