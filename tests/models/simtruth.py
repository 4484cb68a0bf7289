"""Ground truth of simulated frames: the simulator's own probability of each
row's label, from the hidden state (what an oracle seeing the traits knows),
so tests can compare a model's AUC with the best the world allows."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import pandas as pd

from converge.models.simulator import PRODUCTS, World


def true_probabilities(
    world: World, frame: pd.DataFrame, prediction: str, crm_of: Mapping[str, str] | None = None
) -> np.ndarray:
    """One true probability per row of `frame` (rows of `build_from_events`
    or `build_from_services`; `crm_of` maps service customer ids to CRM ids)."""
    customers = frame["customer"].map(crm_of) if crm_of is not None else frame["customer"]
    index = customers.str.rsplit("-", n=1).str[-1].astype(int).to_numpy()
    out = np.empty(len(frame))
    for cutoff, positions in frame.groupby("cutoff").indices.items():
        when = pd.Timestamp(cutoff).to_pydatetime()
        if prediction == "churn":
            out[positions] = world.churn_probability(when)[index[positions]]
        elif prediction == "cross_sell":
            products = frame["product"].to_numpy()[positions]
            columns = np.array([PRODUCTS.index(p) for p in products])
            out[positions] = world.cross_sell_probability(when)[index[positions], columns]
        else:
            tickets = [int(t[1:]) for t in frame["ticket_id"].to_numpy()[positions]]
            out[positions] = world.escalation_probability(tickets, when)
    return np.nan_to_num(out)
