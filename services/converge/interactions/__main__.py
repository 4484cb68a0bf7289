"""`python -m converge.interactions`: runs the interactions service until SIGTERM."""

from converge.interactions.app import SPEC
from converge.interactions.settings import InteractionsSettings
from converge.runtime.server import main

if __name__ == "__main__":
    main(SPEC, InteractionsSettings)
