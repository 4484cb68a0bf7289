"""`python -m converge.scoring`: runs the scoring service until SIGTERM."""

from converge.runtime.server import main
from converge.scoring.app import SPEC
from converge.scoring.settings import ScoringSettings

if __name__ == "__main__":
    main(SPEC, ScoringSettings)
