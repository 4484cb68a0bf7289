"""The recommendation service: next best actions under the active policy and
the contact rules (`decisions`, `contact`, `policy`, `outcomes`), and predicted
alerts delivered to teams (`alerts`, `webhooks`). `servicer.py` routes each RPC
to its area; each area keeps the house rooms (servicer, convert, service,
store)."""
