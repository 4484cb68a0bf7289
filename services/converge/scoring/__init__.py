"""The scoring service: churn, escalation and cross-sell predictions with
reasons, from the MLflow registry's champions over live features (see
`protos/converge/v1/scoring.proto`)."""
