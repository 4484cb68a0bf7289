"""The three real datasets of ../shared/data through the product's own path,
as a user runs it (`tests.benchmarks.product_path`): `converge import FILE
--mapping NAME`, then `converge models train PREDICTION --from-services
--definitions NAME`, against identity and interactions run as processes, each
dataset in a database of its own. No per-dataset code: the dataset's name
picks its shipped mapping, feature set and definitions.

Figures: the test ROC AUC of each (Telco churn, stratified split of the one
snapshot; CDNOW churn, time split; ServiceNow sample escalation, time split),
the wall time of importing plus training the ServiceNow sample, and the peak
resident memory of the process training CDNOW churn from the services. A
dataset that is absent, or a command that fails (its output is printed),
gives NaN rather than stopping the other figures."""

from __future__ import annotations

import math

from rich.console import Console

from tests.benchmarks.harness import BenchEnv
from tests.benchmarks.product_path import RECIPES, SHARED_DATA, CommandFailed, Outcome, run_recipe

AUC_FIGURES = {
    "telco": "models.churn.telco.auc",
    "cdnow": "models.churn.cdnow.auc",
    "itsm_sample": "models.escalation.itsm_sample.auc",
}


async def _outcome(env: BenchEnv, name: str) -> Outcome | None:
    recipe = RECIPES[name]
    err = Console(stderr=True)
    if not (SHARED_DATA / recipe.relative_path).exists():
        err.print(f"{name}: {SHARED_DATA / recipe.relative_path} is absent, skipped")
        return None
    try:
        outcome = await run_recipe(recipe, await env.new_database())
    except CommandFailed as e:
        err.print(f"[red]{name}: the product path failed[/red]\n{e}")
        return None
    err.print(
        f"{name}: import {outcome.imported.seconds:.1f} s, train {outcome.trained.seconds:.1f} s "
        f"(peak {outcome.trained.peak_rss_mb:.0f} MB), AUC {outcome.auc:.3f} "
        f"on {outcome.trained.answer.get('n')} test rows"
    )
    return outcome


async def run(env: BenchEnv) -> dict[str, float]:
    figures: dict[str, float] = {}
    outcomes: dict[str, Outcome | None] = {}
    for name, key in AUC_FIGURES.items():
        outcomes[name] = outcome = await _outcome(env, name)
        figures[key] = outcome.auc if outcome is not None else math.nan
    itsm, cdnow = outcomes["itsm_sample"], outcomes["cdnow"]
    figures["models.product_path.import_train_s"] = (
        itsm.imported.seconds + itsm.trained.seconds if itsm is not None else math.nan
    )
    figures["models.product_path.peak_rss_mb"] = (
        cdnow.trained.peak_rss_mb if cdnow is not None else math.nan
    )
    return figures
