"""The default pipeline on real public data imported through the connectors
into the real services (skipped only when /work/shared/data is absent).

Floors, from what this pipeline measured (never the measurement itself):
- Telco churn: above 0.80, as the issue asks (published gradient boosting:
  0.84-0.85; measured here 0.847 on the stratified test part).
- CDNOW churn (no purchase in 90 days), first 12,000 rows of the log (about
  4,000 customers with whole histories, to keep the suite fast): measured
  about 0.79 on the latest cutoffs; floor 0.72, a margin of several standard
  errors (the test part has a few thousand rows) that a pipeline without
  point-in-time recency and frequency features could not reach (0.5 is no
  skill).
- ITSM reassignment within 72 h from an incident's first two events: measured
  about 0.74 on a test part of about 400 incidents (standard error of the
  AUC about 0.03); floor 0.62, four standard errors below, and well above no
  skill.
"""

from __future__ import annotations

from pathlib import Path

from converge.models import realdata
from tests.conftest import SHARED_DATA, shared_dataset
from tests.models.conftest import FAST


def _need(relative: str) -> Path:
    """The shared data folder, holding `relative` (or a skip)."""
    shared_dataset(relative)
    return SHARED_DATA


async def test_telco_churn_from_identity_profiles_reaches_published_auc(platform) -> None:
    data = _need(realdata.TELCO)
    result = await realdata.telco_churn(
        platform.identity_address, platform.interactions_address, data, FAST
    )
    assert result.split.test.n_examples > 1000
    assert "profile_attr_churned" not in result.model.feature_names
    assert result.auc > 0.80


async def test_cdnow_churn_from_behaviour_beats_its_floor(platform) -> None:
    data = _need(realdata.CDNOW)
    result = await realdata.cdnow_churn(
        platform.identity_address, platform.interactions_address, data, FAST, limit=12_000
    )
    assert result.split.train.window[1] + realdata.CDNOW_WINDOW <= result.split.valid.window[0]
    assert result.evaluation.n > 1000
    assert result.auc > 0.72


async def test_itsm_reassignment_from_first_events_beats_its_floor(platform) -> None:
    data = _need(realdata.ITSM)
    result = await realdata.itsm_escalation(
        platform.identity_address, platform.interactions_address, data, FAST
    )
    assert result.evaluation.n_positive >= 30
    assert result.split.train.window[1] <= result.split.test.window[0]
    assert result.auc > 0.62
