"""`python -m converge.interactions`: runs the interactions service until SIGTERM."""

from converge.interactions.servicer import SPEC
from converge.interactions.settings import InteractionsSettings
from converge.runtime.server import main

if __name__ == "__main__":
    main(SPEC, InteractionsSettings)
