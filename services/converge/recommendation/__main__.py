"""`python -m converge.recommendation`: runs the recommendation service until SIGTERM."""

from converge.recommendation.app import SPEC
from converge.recommendation.settings import RecommendationSettings
from converge.runtime.server import main

if __name__ == "__main__":
    main(SPEC, RecommendationSettings)
